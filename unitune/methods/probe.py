"""Linear probe: the pretrained model stays frozen and only the objective's new task head trains.

The head is the classifier's own (added by the model kind and unfrozen by the objective), so on a model
without a new head there is nothing to train. With nothing else trainable, the classification objective
computes the backbone's features once and trains the head on them.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from unitune.config import Section


class Config(Section):
    name: Literal["probe"] = "probe"


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    return model.requires_grad_(False)
