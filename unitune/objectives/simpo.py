"""SimPO (Meng et al. 2024): preference optimisation without a reference model. The implicit reward
is the policy's mean log-probability per completion token (length-normalised), and the chosen
completion must beat the rejected one by a target margin gamma = gamma_beta_ratio * beta.
`sft_weight` adds the chosen completion's NLL, as CPO (and TRL's CPOTrainer, `cpo_alpha`) does."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from unitune.config import Section
from unitune.objectives import pairs, preference
from unitune.objectives.pairs import PACKS, collate, count, example  # noqa: F401  (the objective's data)


class Config(Section):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)  # the paper's 2.0-2.5; rewards are beta x mean log-probability
    gamma_beta_ratio: float = Field(0.5, ge=0)  # target margin over beta
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0)  # CPO's behaviour-cloning term on the chosen side (TRL's cpo_alpha)
    loss_chunk: int = Field(1024, gt=0)


def loss(model: nn.Module, batch: dict, cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    chosen, rejected, n_chosen, n_rejected = pairs.logps(model, batch, cfg.loss_chunk)
    chosen_avg, rejected_avg = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
    out = preference.simpo(chosen_avg, rejected_avg, beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio,
                           label_smoothing=cfg.label_smoothing)
    total = out.losses.sum()
    if cfg.sft_weight:
        total = total + cfg.sft_weight * pairs.chosen_nll(chosen, n_chosen)
    return total, pairs.metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected, batch)
