"""GRPO's advantages and clipped loss equal TRL's GRPOTrainer on the same tensors (values, gradients,
logged KL and clip fractions); advantages against a hand-computed case."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from unitune.rl import losses


def _bare_trl(loss_type, beta, eps_low, eps_high, max_len, accum=1):
    trainer = object.__new__(GRPOTrainer)
    accelerator = SimpleNamespace(num_processes=1, gather=lambda t: t, gather_for_metrics=lambda t: t,
                                  reduce=lambda t, reduction: t, sync_gradients=True)
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accum)
    for name, value in dict(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                            beta=beta, args=args, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
                            use_vllm=False, vllm_importance_sampling_correction=False,
                            model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accum,
                            max_completion_length=max_len, accelerator=accelerator, _entropy_bonus_enabled=False,
                            aux_loss_enabled=False, _metrics={"train": defaultdict(list)}).items():
        setattr(trainer, name, value)
    return trainer


def _tensors(b=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    old = logps.detach() + torch.randn(b, t, generator=g) * 0.3  # some ratios beyond 1 +- 0.2
    ref = logps.detach() + torch.randn(b, t, generator=g) * 0.2
    mask = torch.ones(b, t)
    for i, n in enumerate([7, 3, 5, 1, 6, 4][:b]):
        mask[i, n:] = 0
    adv = torch.randn(b, generator=g)
    return logps, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("beta,eps_high,use_old", [(0.0, 0.2, True), (0.04, 0.28, True), (0.04, 0.2, False)])
def test_clipped_loss_equals_trl(loss_type, beta, eps_high, use_old):
    logps, old, ref, mask, adv = _tensors()
    out = losses.clipped_policy_loss(logps, old if use_old else None, adv, mask, loss_type, 0.2, eps_high, beta, ref)
    ours = out.loss / losses.normaliser(loss_type, mask, max_completion_length=9)
    ours.backward()
    our_grad, logps.grad = logps.grad.clone(), None

    trainer = _bare_trl(loss_type, beta, 0.2, eps_high, 9)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.rand_like(logps), None)
    inputs = {"prompt_ids": torch.zeros(6, 2, dtype=torch.long), "prompt_mask": torch.ones(6, 2),
              "completion_ids": torch.zeros(6, 7, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": mask.sum()}
    if use_old:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs = GRPOTrainer._compute_loss(trainer, None, inputs)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(our_grad, logps.grad, atol=1e-7, rtol=1e-5)
    logged = trainer._metrics["train"]
    n = mask.sum()
    assert float((out.clipped * mask).sum() / n) == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-7)
    if use_old:
        assert logged["clip_ratio/region_mean"][0] > 0  # the case exercises clipping
    if beta:
        assert float((out.kl * mask).sum() / n) == pytest.approx(logged["kl"][0], rel=1e-6)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, no_signal = losses.group_advantages(rewards, 4)
    # group 1: mean 0.25, unbiased std 0.5; group 2: all equal, no signal
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(adv[:4], expected)
    assert adv[4:].abs().max() == 0 and no_signal.tolist() == [False] * 4 + [True] * 4
    adv, _ = losses.group_advantages(rewards, 4, "none")  # Dr. GRPO: mean-centred only
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    adv, _ = losses.group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(adv, (rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)) / (rewards.std() + 1e-4))
    nan = torch.tensor([1.0, float("nan"), 3.0, 3.0])  # a failed reward is ignored, its advantage 0
    adv, _ = losses.group_advantages(nan, 4)
    assert adv[1] == 0 and adv[0] < 0 < adv[2]


def _ppo_case(seed, truncated_row=True):
    """A rollout of 5 completions of up to 8 tokens: end-of-turn at different places, one without
    (truncated at max_new_tokens), pad after the end; log-probs, values and scores at random."""
    g = torch.Generator().manual_seed(seed)
    eot, pad, t = 2, 0, 8
    responses = torch.randint(3, 50, (5, t), generator=g)
    for i, end in enumerate([3, 0, 6, 7, None if truncated_row else 4]):
        if end is not None:
            responses[i, end] = eot
            responses[i, end + 1 :] = pad
    mask = torch.ones(5, t)
    for i in range(5):
        ends = (responses[i] == eot).nonzero()
        if len(ends):
            mask[i, int(ends[0]) + 1 :] = 0
    rand = lambda *s: torch.randn(*s, generator=g)
    logps, ref, values, scores = -rand(5, t).abs(), -rand(5, t).abs(), rand(5, t), rand(5)
    return responses, mask, logps, ref, values, scores


@pytest.mark.parametrize("estimator,whiten,gamma,lam,truncated", [("k1", False, 1.0, 0.95, True),
                                                                    ("k3", True, 0.9, 0.5, True),
                                                                    ("k1", True, 1.0, 1.0, False)])
def test_ppo_advantages_and_losses_equal_trl(estimator, whiten, gamma, lam, truncated):
    from tests.rl import trl_ppo

    responses, mask, logps, ref, values, scores = _ppo_case(0, truncated)
    args = SimpleNamespace(missing_eos_penalty=None, kl_estimator=estimator, kl_coef=0.05, whiten_rewards=whiten,
                           gamma=gamma, lam=lam, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    theirs = trl_ppo.rollout(responses, logps, ref, values, scores, 2, 0, 2, args)
    ours = losses.ppo_advantages(scores, logps, ref, values, mask, 0.05, estimator, gamma, lam, whiten)
    assert (~theirs["padding_mask"]).float().equal(mask)
    torch.testing.assert_close(ours.advantages, theirs["advantages"])
    torch.testing.assert_close(ours.returns, theirs["returns"])
    torch.testing.assert_close(ours.values, theirs["values"])
    torch.testing.assert_close(ours.kl, theirs["kl"])

    # an update later: new log-probs off the old by enough to clip, new values off the old by enough to clip
    g = torch.Generator().manual_seed(1)
    new_logps = (logps + torch.randn(5, 8, generator=g) * 0.4).requires_grad_()
    new_values = (values + torch.randn(5, 8, generator=g) * 0.5).requires_grad_()
    out = losses.ppo_loss(new_logps, logps, ours.advantages, mask, new_values, ours.values, ours.returns,
                          0.2, 0.2, 0.1)
    (out.loss / mask.sum()).backward()
    grads = new_logps.grad.clone(), new_values.grad.clone()
    new_logps.grad = new_values.grad = None
    ref_out = trl_ppo.micro_batch_loss(new_logps, new_values, theirs, args)
    ref_out["loss"].backward()
    torch.testing.assert_close(out.loss / mask.sum(), ref_out["loss"])
    torch.testing.assert_close(grads[0], new_logps.grad)
    torch.testing.assert_close(grads[1], new_values.grad)
    torch.testing.assert_close(out.policy, ref_out["pg_loss"])
    torch.testing.assert_close(out.value, ref_out["vf_loss"])
    torch.testing.assert_close(out.approx_kl, ref_out["approxkl"])
    assert float(out.clipped.sum() / mask.sum()) == pytest.approx(float(ref_out["pg_clipfrac"]))
    vmask = losses.value_mask(mask)
    assert float(out.value_clipped.sum() / vmask.sum()) == pytest.approx(float(ref_out["vf_clipfrac"]))
    assert 0 < float(ref_out["pg_clipfrac"]) < 1 and 0 < float(ref_out["vf_clipfrac"]) < 1  # both clips act


def test_ppo_score_enters_after_the_last_token_by_hand():
    """One completion of 2 tokens in a row of 4, gamma 1, lambda 1, no KL: the score sits at position 2
    (after the end-of-turn), position 3 is padding and out of everything."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 1.0, 7.0]])
    out = losses.ppo_advantages(torch.tensor([2.0]), torch.zeros(1, 4), torch.zeros(1, 4), values, mask, 0.0,
                                gamma=1.0, lam=1.0)
    torch.testing.assert_close(out.rewards, torch.tensor([[0.0, 0.0, 2.0, 0.0]]))
    torch.testing.assert_close(out.returns, torch.tensor([[2.0, 2.0, 2.0, 0.0]]))  # lambda 1: the score
    assert losses.value_mask(mask).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_whitening_and_adaptive_kl_by_hand():
    x, m = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(losses.masked_whiten(x, m)[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(losses.masked_whiten(x, m, shift_mean=False)[:3], torch.tensor([1.0, 2.0, 3.0]),
                               atol=1e-6, rtol=0)
    ctl = losses.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped to +20%
    assert ctl.update(3.0, 100) == pytest.approx(0.1 * 1.002 * (1 - 0.2 * 0.01))
