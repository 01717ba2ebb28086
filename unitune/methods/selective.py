"""Selective fine-tuning: train a chosen subset of the base model's own parameters.

BitFit, LayerNorm tuning and partial freezing differ only in which parameters they pick; they
add no modules, so the result saves as an ordinary model directory.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn


def train_only(model: nn.Module, pick: Callable[[str, nn.Parameter], bool], method: str, hint: str) -> nn.Module:
    chosen = 0
    for name, p in model.named_parameters():
        p.requires_grad_(pick(name, p))
        chosen += p.requires_grad
    if not chosen:
        raise ValueError(f"method '{method}' finds nothing to train in {type(model).__name__}: {hint}")
    return model


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, and the RMSNorm classes each architecture defines for itself."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the longest ModuleList (model.layers, transformer.h, ...)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of blocks to choose from")
    return max(lists, key=lambda nm: len(nm[1]))
