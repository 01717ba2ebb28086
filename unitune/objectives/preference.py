"""The math of learning from preferences: pure functions of sequence log-probabilities (or of a
reward model's scalar scores), each equal to TRL 1.16's on the same numbers.

Every function returns per-example tensors, so the caller chooses the reduction (TRL's trainers
take the mean over the micro-batch); rewards and logging terms come back detached. Whether a
log-probability is the sum or the mean over the completion's tokens belongs to each loss's
definition, and the caller must feed what TRL feeds:

- `dpo`: sums. The types in `AVERAGED` divide by the completion lengths themselves, as TRL does,
  so that their rewards are still logged on the summed scale as TRL logs them.
- `simpo`, `orpo_odds_ratio`: means (TRL's CPOTrainer and ORPOTrainer use `average_log_prob=True`).
- `kto`: sums.
- `bradley_terry`: a reward model's scalar scores, not log-probabilities.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLoss(NamedTuple):
    losses: Tensor            # one per pair, to be reduced by the caller
    chosen_rewards: Tensor    # detached: the implicit rewards TRL logs as rewards/chosen
    rejected_rewards: Tensor  # detached: rewards/rejected


class OddsRatio(NamedTuple):
    losses: Tensor            # -beta * log sigmoid(log odds): ORPO = chosen NLL + losses.mean()
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    log_odds_ratio: Tensor    # log sigmoid(log odds) per pair; TRL logs its mean under this name
    log_odds_chosen: Tensor   # the log odds per pair; TRL logs its mean under this name


class KTOLoss(NamedTuple):
    losses: Tensor            # desirable examples first, then undesirable ones, each weighted
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor                # the batch's clamped, detached KL estimate (a scalar)


def _logistic(h: Tensor, eps: float) -> Tensor:
    """-log sigmoid(h), or with eps > 0 its expectation when the preference is flipped with
    probability eps (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences")."""
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


# Each DPO-family loss maps the policy-minus-reference log-ratios of the chosen and rejected
# completions (c, r), beta and the label smoothing to per-pair losses.
DPOLoss = Callable[[Tensor, Tensor, float, float], Tensor]


def _sigmoid(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7.
    return _logistic(beta * (c - r), eps)


def _ipo(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17 with tau = beta, on per-token means: the
    # squared loss of summed log-ratios would grow with length (TRL, confirmed with the authors).
    return (c - r - 1 / (2 * beta)) ** 2


def _hinge(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # SLiC's calibration hinge (Zhao et al. 2023, arXiv:2305.10425) on DPO's log-ratios, as in RSO
    # (Liu et al. 2023, arXiv:2309.06657).
    return torch.relu(1 - beta * (c - r))


def _robust(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409): unbiased under labels flipped with
    # probability eps, unlike conservative DPO, which only shrinks the gradient of confident pairs.
    h = beta * (c - r)
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def _exo_pair(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # EXO, Ji et al. 2024 (arXiv:2402.00856), Eq. 16 with K = 2: KL(p_theta || p_label) between the
    # policy's softmax over {chosen, rejected} and the smoothed label distribution [1 - eps, eps].
    h = beta * (c - r)
    return (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps))
            + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps)))


def _nca_pair(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # NCA, Chen et al. 2024 (arXiv:2402.05369): absolute rewards, so the chosen likelihood cannot
    # fall with the rejected one as it can under DPO.
    return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)


def _bco_pair(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # BCO, Jung et al. 2024 (arXiv:2404.04656), paired form without the paper's running reward
    # shift delta: TRL's DPOTrainer keeps no state, and neither does this.
    return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)


def _apo_zero(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266), Eq. 7: chosen outputs are better than
    # the model's own, so raise the chosen likelihood and lower the rejected one.
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


def _apo_down(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # APO-down, same paper, Eq. 8: chosen outputs are worse than the model's own, so lower both
    # likelihoods, the rejected one more.
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


def _sppo_hard(c: Tensor, r: Tensor, beta: float, eps: float) -> Tensor:
    # SPPO, Wu et al. 2024 (arXiv:2405.00675), Eq. 4.7 with the win probability P set to 1 for the
    # chosen completion and 0 for the rejected one.
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


DPO_LOSSES: dict[str, DPOLoss] = {
    "sigmoid": _sigmoid,
    "sigmoid_norm": _sigmoid,  # DPO on per-token means (AVERAGED)
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "sppo_hard": _sppo_hard,
}
# Loss types whose log-ratios are per-token means of the completion: `dpo` divides by the lengths.
AVERAGED = frozenset({"ipo", "sigmoid_norm"})
# Loss types that read label_smoothing, with the values each accepts: conservative and robust DPO
# read it as the probability that a label is flipped (from 1/2 on, the preference reverses); EXO
# takes its logarithm.
SMOOTHED: dict[str, tuple[Callable[[float], bool], str]] = {
    "sigmoid": (lambda eps: 0 <= eps < 0.5, "[0, 0.5)"),
    "robust": (lambda eps: 0 <= eps < 0.5, "[0, 0.5)"),
    "exo_pair": (lambda eps: 0 < eps < 1, "(0, 1)"),
}


def dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
        beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
        chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> PairLoss:
    """The DPO family on per-pair log-probabilities SUMMED over each completion's tokens, for the
    policy and the reference, as TRL's DPOTrainer (f_divergence_type="reverse_kl", no WPO
    weighting, ld_alpha unset). For the loss types in AVERAGED, pass the completion token counts
    too: the log-ratios are divided by them (at least 1) as TRL does, and rewards stay on the sum.

    label_smoothing: with "sigmoid", conservative DPO (TRL 1.16 ignores it there; older TRL and
    the cDPO note apply it); with "robust", the flip probability in [0, 0.5); with "exo_pair",
    EXO's epsilon in (0, 1). Any other loss type refuses a nonzero value rather than ignore it.
    """
    _check_dpo(beta, loss_type, label_smoothing, chosen_lengths, rejected_lengths)
    chosen = chosen_logps - ref_chosen_logps
    rejected = rejected_logps - ref_rejected_logps
    c, r = chosen, rejected
    if loss_type in AVERAGED:
        c = chosen / chosen_lengths.clamp(min=1)
        r = rejected / rejected_lengths.clamp(min=1)
    losses = DPO_LOSSES[loss_type](c, r, beta, label_smoothing)
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def _check_dpo(beta: float, loss_type: str, label_smoothing: float,
               chosen_lengths: Tensor | None, rejected_lengths: Tensor | None) -> None:
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo: unknown loss_type {loss_type!r}: set objective.loss_type to one of "
                         f"{', '.join(DPO_LOSSES)}")
    if not beta > 0:
        raise ValueError(f"dpo: beta={beta} must be positive (set objective.beta, e.g. 0.1)")
    if loss_type in SMOOTHED:
        accepts, allowed = SMOOTHED[loss_type]
        if not accepts(label_smoothing):
            raise ValueError(f"dpo: label_smoothing={label_smoothing} is outside {allowed} for loss_type "
                             f"{loss_type!r}: set objective.label_smoothing inside it")
    elif label_smoothing != 0:
        raise ValueError(f"dpo: loss_type {loss_type!r} does not use label_smoothing={label_smoothing}: set "
                         f"objective.label_smoothing to 0, or use one of {', '.join(SMOOTHED)}")
    if loss_type in AVERAGED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"dpo: loss_type {loss_type!r} averages over completion tokens: pass chosen_lengths "
                         "and rejected_lengths (the completion token counts)")


def simpo(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float, gamma_beta_ratio: float,
          label_smoothing: float = 0.0) -> PairLoss:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), Eq. 6: no reference model; log-probabilities
    are MEANS over each completion's tokens, and the target margin is gamma = gamma_beta_ratio *
    beta (TRL's CPOTrainer with loss_type="simpo" takes gamma itself as `simpo_gamma`).
    label_smoothing in [0, 0.5) smooths it as conservative DPO smooths DPO, as TRL does.
    Rewards are beta times the mean log-probabilities, as TRL logs them."""
    accepts, allowed = SMOOTHED["sigmoid"]
    if not accepts(label_smoothing):
        raise ValueError(f"simpo: label_smoothing={label_smoothing} is outside {allowed}: set "
                         "objective.label_smoothing inside it")
    h = beta * (chosen_avg_logps - rejected_avg_logps - gamma_beta_ratio)
    return PairLoss(_logistic(h, label_smoothing), beta * chosen_avg_logps.detach(),
                    beta * rejected_avg_logps.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float) -> OddsRatio:
    """ORPO's odds-ratio term, Hong et al. 2024 (arXiv:2403.07691), Eqs. 4 and 7, on log-probabilities
    that are MEANS over each completion's tokens. log odds(y) = logp - log(1 - exp(logp)).

    Sign: TRL's `odds_ratio_loss` returns beta * log sigmoid(log odds ratio), a log-likelihood, and
    its trainer subtracts the mean (loss = NLL - losses.mean()). Here `losses` is that term's
    negative, a loss like every other in this module: ORPO's loss is chosen NLL + losses.mean().
    Computed in at least float32, as TRL does (it casts with .float(); a float64 input stays so).
    """
    dtype = torch.promote_types(chosen_avg_logps.dtype, torch.float32)
    chosen, rejected = chosen_avg_logps.to(dtype), rejected_avg_logps.to(dtype)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return OddsRatio(-beta * ratio, beta * chosen.detach(), beta * rejected.detach(), ratio.detach(),
                     log_odds.detach())


def kto(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, policy_kl_logps: Tensor,
        ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, ref_kl_logps: Tensor, *, beta: float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOLoss:
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), Eq. 7, as TRL's KTOTrainer (loss_type="kto"),
    on log-probabilities SUMMED over each completion's tokens. The chosen (desirable) and rejected
    (undesirable) sides may have different sizes, either possibly empty.

    The reference point z0 = KL(policy || reference) is estimated from mismatched (prompt,
    completion) pairs of the same batch (the *_kl_logps, one per example): their mean log-ratio,
    clamped at 0 (a KL is not negative) and detached, since the paper does not backpropagate
    through z0. TRL averages it over the micro-batch (and over ranks, before the clamp).
    TRL's loss is the mean of `losses` over all examples.
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return KTOLoss(losses, beta * chosen.detach(), beta * rejected.detach(), kl)


def bradley_terry(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                  center_rewards_coefficient: float | None = None) -> Tensor:
    """Per-pair reward-model loss, as TRL's RewardTrainer (whose loss is these losses' mean):
    -log sigmoid(r_chosen - r_rejected - margin), the Bradley-Terry likelihood (InstructGPT, Ouyang
    et al. 2022, Eq. 1) with Llama 2's per-pair margin (Touvron et al. 2023, arXiv:2307.09288, Eq. 2);
    plus center_rewards_coefficient * (r_chosen + r_rejected)^2, which pulls rewards towards zero
    mean (Eisenstein et al. 2023, arXiv:2312.09244, Eq. 2): BT is blind to a shift of all rewards.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses
