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
