"""Full fine-tuning: every parameter trains (optionally all but the embeddings)."""
from __future__ import annotations

from typing import Literal

from torch import nn

from unitune.config import Section


class Config(Section):
    name: Literal["full"] = "full"
    freeze_embeddings: bool = False  # input embeddings frozen: saves their optimizer state


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model
