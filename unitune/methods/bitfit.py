"""BitFit: train only the bias terms (Ben Zaken et al., 2022)."""
from __future__ import annotations

from typing import Literal

from torch import nn

from unitune.config import Section
from unitune.methods.selective import train_only


class Config(Section):
    name: Literal["bitfit"] = "bitfit"


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    return train_only(model, lambda name, p: name.endswith(".bias"), "bitfit",
                      "it has no bias terms (Llama-family models have none); use lora or ia3")
