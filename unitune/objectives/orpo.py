"""ORPO (Hong et al. 2024): supervised fine-tuning on the chosen completion plus an odds-ratio
penalty that pushes the rejected one down, in one stage and with no reference model.

As TRL's ORPOTrainer: loss = NLL of the chosen tokens (their mean over the micro-batch) + mean over
pairs of -beta * log sigmoid(log odds ratio), the odds computed from per-token mean log-probabilities.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from unitune.config import Section
from unitune.objectives import pairs, preference
from unitune.objectives.pairs import PACKS, collate, count, example  # noqa: F401  (the objective's data)


class Config(Section):
    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0)  # the paper's lambda: weight of the odds-ratio term
    loss_chunk: int = Field(1024, gt=0)


def loss(model: nn.Module, batch: dict, cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    chosen, rejected, n_chosen, n_rejected = pairs.logps(model, batch, cfg.loss_chunk)
    out = preference.orpo_odds_ratio(chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1), beta=cfg.beta)
    nll = pairs.chosen_nll(chosen, n_chosen)
    figures = pairs.metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected, batch)
    return nll + out.losses.sum(), {**figures, "nll_loss": nll.detach(), "log_odds_ratio": out.log_odds_ratio.sum(),
                                    "log_odds_chosen": out.log_odds_chosen.sum()}
