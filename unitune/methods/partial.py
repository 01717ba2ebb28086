"""Partial freezing: train the last N transformer blocks and/or named modules, freeze the rest."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from unitune.config import Section
from unitune.methods.selective import blocks, train_only
from unitune.methods.targets import matches


class Config(Section):
    name: Literal["partial"] = "partial"
    last_n_blocks: int = Field(0, ge=0)
    modules: str | list[str] = []  # module names (PEFT-style match) trained in full, e.g. [norm, lm_head]


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    stack = blocks(model)
    if cfg.last_n_blocks > len(stack):
        raise ValueError(f"method.last_n_blocks={cfg.last_n_blocks} but the model has {len(stack)} blocks")
    chosen = set(stack[len(stack) - cfg.last_n_blocks:])
    chosen |= {n for n, _ in model.named_modules() if n and cfg.modules and matches(n, cfg.modules)}

    def pick(name: str, p) -> bool:
        return any(name.startswith(c + ".") for c in chosen)

    return train_only(model, pick, "partial", "set method.last_n_blocks or method.modules")
