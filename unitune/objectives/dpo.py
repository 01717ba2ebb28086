"""Direct preference optimisation (Rafailov et al. 2023) and the variants TRL names by `loss_type`
(IPO, robust and conservative DPO, hinge, EXO, NCA, BCO, APO, SPPO): the policy learns to raise the
log-probability of the chosen completion over the rejected one, relative to a reference policy,
with no reward model and no sampling.

Chosen and rejected run through the model in one forward pass (2B rows sharing their prompt
tokens by construction), and only completion tokens reach the LM head. The reference is the same
model with its adapters switched off (no second copy) or, for full fine-tuning, a frozen copy.
The math is in objectives/preference.py, tested against TRL's on the same tensors.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from unitune.config import Section
from unitune.objectives import pairs, preference
from unitune.objectives.pairs import PACKS, collate, count, example  # noqa: F401  (the objective's data)

NEEDS_REF = True


class Config(Section):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)  # how far the policy may move from the reference (the KL weight)
    loss_type: Literal[tuple(preference.DPO_LOSSES)] = "sigmoid"  # type: ignore[valid-type]
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # conservative/robust DPO: the chance a label is wrong
    # RPO (Pang et al. 2024; TRL's rpo_alpha): add the chosen completions' NLL. Plain DPO can separate the
    # pairs while lowering the chosen answer's likelihood too; this keeps the model writing it.
    rpo_alpha: float | None = Field(None, ge=0)
    loss_chunk: int = Field(1024, gt=0)  # completion tokens per vocabulary-projection chunk
    # compute the reference log-probs of the pairs the run uses once, before training (TRL's
    # precompute_ref_log_probs): two passes a step instead of three, and no frozen copy under full FT
    precompute_ref: bool = False


def reference_logps(reference: nn.Module, batch: dict, cfg: Config) -> torch.Tensor:
    """[pairs, 2]: the reference's chosen and rejected log-probs, for engine/precompute.py."""
    chosen, rejected, _, _ = pairs.logps(reference, batch, cfg.loss_chunk)
    return torch.stack([chosen, rejected], 1)


def loss(model: nn.Module, batch: dict, cfg: Config, ref) -> tuple[torch.Tensor, dict]:
    chosen, rejected, n_chosen, n_rejected = pairs.logps(model, batch, cfg.loss_chunk)
    if "ref_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_logps"].to(chosen.dtype).unbind(1)
    else:
        with torch.no_grad(), ref() as reference:
            ref_chosen, ref_rejected = reference_logps(reference, batch, cfg).unbind(1)
    out = preference.dpo(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss_type,
                         label_smoothing=cfg.label_smoothing, chosen_lengths=n_chosen, rejected_lengths=n_rejected)
    total = out.losses.sum()
    if cfg.rpo_alpha:
        total = total + cfg.rpo_alpha * pairs.chosen_nll(chosen, n_chosen)
    return total, pairs.metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected, batch)
