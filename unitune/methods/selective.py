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


def blocks(model: nn.Module) -> list[str]:
    """The model's blocks in forward order, by name. A transformer's are its longest ModuleList (model.layers,
    transformer.h, ...). A CNN's are the members of its sequential stages, flattened: ResNet's layer1.0 ...
    layer4.1, MobileNetV2's features.0 ... features.18, EfficientNet's stem, each MBConv and its last conv."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if lists:
        name, stack = max(lists, key=lambda nm: len(nm[1]))
        if len(stack) > 1:
            return [f"{name}.{i}" for i in range(len(stack))]
    found = _stage_members(model, "")
    if not found:
        raise ValueError(f"{type(model).__name__} has no list of blocks to choose from")
    return found


def _is_stage(m: nn.Module) -> bool:
    """A sequential container whose members are all blocks (modules with submodules and parameters)."""
    return isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 0 and all(
        any(True for _ in c.children()) and any(True for _ in c.parameters()) for c in m)


def _stage_members(module: nn.Module, prefix: str) -> list[str]:
    found = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        found += _flatten(child, full) if _is_stage(child) else _stage_members(child, full)
    return found


def _flatten(stage: nn.Module, prefix: str) -> list[str]:
    """A stage's members; a member that is a stage itself (EfficientNet's features.1) gives its own."""
    found = []
    for name, member in stage.named_children():
        found += _flatten(member, f"{prefix}.{name}") if _is_stage(member) else [f"{prefix}.{name}"]
    return found
