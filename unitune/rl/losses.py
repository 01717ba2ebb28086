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


# --- PPO (Ouyang et al. 2022) as TRL's PPOTrainer computes it (trl 1.12, trl/experimental/ppo/ppo_trainer.py;
# TRL removed it in 1.14). `mask` [B, T] marks the completion's tokens, end-of-turn included (TRL's
# ~padding_mask). The sequence's score enters one step after its last token, where the value head has
# read the whole completion; that position carries value loss but no policy loss (TRL's padding_mask_p1).

def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); shift_mean=False keeps the mean, as
    reward whitening does (TRL's masked_whiten)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def value_mask(mask: Tensor) -> Tensor:
    """The positions whose values train: the completion's tokens and the one after its last (when the
    completion ended before max_new_tokens), where its score is credited."""
    lengths = mask.sum(1, keepdim=True)
    return (torch.arange(mask.shape[1], device=mask.device) <= lengths).to(mask.dtype)


class Advantages(NamedTuple):
    advantages: Tensor  # [B, T] whitened over the completion tokens, 0 elsewhere
    returns: Tensor     # [B, T] the value head's targets
    values: Tensor      # [B, T] the rollout's values, 0 past value_mask
    kl: Tensor          # [B, T] per-token KL estimate to the reference (0 off the completion)
    rewards: Tensor     # [B, T] -kl_coef x kl, the score added at its step


def ppo_advantages(scores: Tensor, logps: Tensor, ref_logps: Tensor, values: Tensor, mask: Tensor, kl_coef: float,
                   estimator: Literal["k1", "k3"] = "k1", gamma: float = 1.0, lam: float = 0.95,
                   whiten_rewards: bool = False) -> Advantages:
    """Per-token rewards (a KL penalty at every token, the score at the step after the last; Ziegler et al.
    2019), GAE (Schulman et al. 2016) and the whitened advantages, from one rollout's tensors."""
    vmask = value_mask(mask)
    logr = (ref_logps - logps) * mask
    kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr  # Schulman 2020's k1 and k3
    rewards = -kl_coef * kl
    lengths = mask.sum(1).long()
    end = torch.where(lengths < mask.shape[1], lengths, lengths - 1)  # a truncated completion: its last token
    rewards[torch.arange(len(scores)), end] += scores
    if whiten_rewards:
        rewards = masked_whiten(rewards, vmask, shift_mean=False) * vmask
    values = values * vmask
    last, out = torch.zeros_like(scores), []
    for t in reversed(range(mask.shape[1])):
        next_value = values[:, t + 1] if t + 1 < mask.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], 1)
    returns = advantages + values
    return Advantages(masked_whiten(advantages, mask) * mask, returns, values, kl, rewards)


class PPOLoss(NamedTuple):
    loss: Tensor          # the policy loss summed over `mask`, plus vf_coef x the value loss in the same units
    policy: Tensor        # the policy loss's masked mean (TRL's pg_loss), detached
    value: Tensor         # the value loss's masked mean (TRL's vf_loss), detached
    clipped: Tensor       # [B, T] bool: policy tokens whose clipped term was the larger
    value_clipped: Tensor # [B, T] bool: value positions whose clipped term was the larger
    approx_kl: Tensor     # 0.5 x mean squared log-ratio (TRL's approxkl)


def ppo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, values: Tensor, old_values: Tensor,
             returns: Tensor, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1) -> PPOLoss:
    """PPO's clipped policy loss and clipped value loss, 0.5 x max((v - R)^2, (clip(v, v_old +- c) - R)^2).
    Divided by mask.sum() the loss is TRL's `pg_loss + vf_coef * vf_loss` for this batch."""
    vmask = value_mask(mask)
    mask = mask.to(logps.dtype)
    values = values * vmask
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    v1, v2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(v1, v2), vmask)
    diff = (logps - old_logps) * mask
    ratio = torch.exp(diff)
    pg1, pg2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_sum = (torch.max(pg1, pg2) * mask).sum()
    n = mask.sum()
    loss = pg_sum + vf_coef * vf_loss * n
    return PPOLoss(loss, (pg_sum / n).detach(), vf_loss.detach(), ((pg2 > pg1) & mask.bool()).detach(),
                   ((v2 > v1) & vmask.bool()).detach(), (0.5 * (diff**2).mean()).detach())


class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. 2019 (Eq. 2): move kl_coef so that the observed KL
    tracks `target` over `horizon` samples; the error is clipped to +-20%."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon
        return self.value
