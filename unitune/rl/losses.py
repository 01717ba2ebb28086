"""Advantages and policy-gradient losses as pure functions of tensors, equal to TRL's GRPOTrainer
(trl 1.16, `_generate_and_score_completions` and `_compute_loss`) on the same inputs.

Shapes: B completions of T tokens; `mask` [B, T] is 1 on completion tokens that carry loss. The
losses return the *sum* the engine divides by the objective's count (see `normaliser`), so gradient
accumulation gives the gradient of one large batch for every loss type.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
Scale = Literal["group", "batch", "none"]


def group_advantages(rewards: Tensor, num_generations: int, scale: Scale = "group") -> tuple[Tensor, Tensor]:
    """GRPO's advantages (Shao et al. 2024): each completion's reward minus its group's mean, divided by
    the group's standard deviation ("group", the paper), the batch's ("batch", Hu et al. 2025's REINFORCE++
    baseline) or not at all ("none", Dr. GRPO, Liu et al. 2025). Rewards are [B], grouped by consecutive
    num_generations. Also returns whether each group's rewards were all equal (no signal; TRL logs it)."""
    grouped = rewards.view(-1, num_generations)
    mean = grouped.nanmean(1).repeat_interleave(num_generations)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased standard deviation ignoring NaNs (TRL's nanstd)."""
    mean = x.nanmean(dim=dim, keepdim=dim is not None)
    var = ((x - mean) ** 2).nansum(dim=dim) / ((~x.isnan()).sum(dim=dim) - 1)
    return var.sqrt()


class PolicyLoss(NamedTuple):
    loss: Tensor          # summed as `normaliser` says; divide by the batch's count for TRL's loss
    kl: Tensor            # per-token KL to the reference [B, T] (zeros when beta == 0), detached
    clipped: Tensor       # [B, T] bool: tokens whose ratio was clipped (low or high side), detached
    ratio: Tensor         # [B, T] importance ratio, detached


def normaliser(loss_type: str, mask: Tensor, max_completion_length: int) -> float:
    """What TRL divides the summed per-token loss by, for one batch: sequences (grpo, each one's mean
    over its tokens), B x max_completion_length (dr_grpo), or the tokens carrying loss (dapo)."""
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_completion_length)
    return float(mask.sum().clamp(min=1))


def clipped_policy_loss(logps: Tensor, old_logps: Tensor | None, advantages: Tensor, mask: Tensor,
                        loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                        beta: float = 0.0, ref_logps: Tensor | None = None) -> PolicyLoss:
    """PPO's clipped surrogate on per-token importance ratios, with GRPO's per-token KL estimator to the
    reference (k3 of Schulman 2020: exp(ref - logp) - (ref - logp) - 1) weighted by beta; DAPO's
    asymmetric clipping (Yu et al. 2025) through epsilon_high. `old_logps` None: the policy that
    sampled is this one (num_iterations 1), so the ratio is 1 with the policy's own gradient."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = torch.zeros_like(logps)
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":  # each sequence's mean over its tokens, summed over sequences
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif loss_type in ("dr_grpo", "dapo"):
        loss = (per_token * mask).sum()
    else:
        raise ValueError(f"unknown loss_type '{loss_type}': valid: {', '.join(LOSS_TYPES)}")
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return PolicyLoss(loss, kl.detach(), clipped.detach(), ratio.detach())
