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


def test_gae_by_hand():
    """One completion of 3 tokens, gamma 0.9, lambda 0.5: deltas and their discounted sums written out."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 9.0]])  # position 3 is past the end: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.2                      # last token: no next value
    d1 = 0.0 + 0.9 * 0.2 - 0.4
    d0 = 0.0 + 0.9 * 0.4 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.2, 0.0]]))


def test_ppo_rewards_whitening_value_loss_and_adaptive_kl_by_hand():
    logps, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    rewards, kl = losses.kl_penalised_rewards(torch.tensor([2.0]), logps, ref, torch.tensor([2]), kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0]]))  # k1: logp - ref
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0]]))  # the score at the last token
    _, k3 = losses.kl_penalised_rewards(torch.tensor([0.0]), logps, ref, torch.tensor([3]), 0.1, "k3")
    assert (k3 >= 0).all()  # k3 is never negative
    x, m = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(losses.masked_whiten(x, m)[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(losses.masked_whiten(x, m, shift_mean=False)[:3], torch.tensor([1.0, 2.0, 3.0]),
                               atol=1e-6, rtol=0)
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([2.0, 1.0])
    loss, frac = losses.clipped_value_loss(v, old, ret, torch.ones(2), clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 1.69; token 1: both 1 -> 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2) and frac.item() == 0.5
    ctl = losses.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped to +20%
    assert ctl.update(3.0, 100) == pytest.approx(0.1 * 1.002 * (1 - 0.2 * 0.01))
