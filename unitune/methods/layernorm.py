"""LayerNorm tuning: train only the normalisation layers' scales and shifts (Zhao et al., 2023)."""
from __future__ import annotations

from typing import Literal

from torch import nn

from unitune.config import Section
from unitune.methods.selective import is_norm, train_only


class Config(Section):
    name: Literal["layernorm"] = "layernorm"


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    norms = {n for n, m in model.named_modules() if is_norm(m)}
    return train_only(model, lambda name, p: name.rsplit(".", 1)[0] in norms, "layernorm",
                      "no LayerNorm/RMSNorm module found")
