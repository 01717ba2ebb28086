"""LoRA: a trainable low-rank update B·A beside each frozen target layer (Hu et al., 2021).

y = W x + (alpha / r) · B A dropout(x), with A Kaiming-uniform and B zero so training starts
at the base model. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead, which keeps
the update's size stable as the rank grows. Layout and init follow PEFT's LoraLayer, so an
adapter moves between the two tools with the same numbers.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from unitune.config import Section
from unitune.methods.targets import find_targets, set_module


class Config(Section):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    rslora: bool = False


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) with named LoRA adapters beside it."""

    def __init__(self, base: nn.Module, adapter: str, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base_layer = base
        # Conv1D stores its weight as (in, out): the transpose of nn.Linear's.
        self.fan_in_fan_out = isinstance(base, Conv1D)
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged = False
        self.add_adapter(adapter, r, alpha, dropout, rslora)

    def add_adapter(self, adapter: str, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        device = self.base_layer.weight.device
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter] = alpha / math.sqrt(r) if rslora else alpha / r
        nn.init.kaiming_uniform_(self.lora_A[adapter].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter].weight)
        self.active = adapter

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """The update B·A·scale in the base weight's layout."""
        delta = self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        if self.active is None or self.merged:
            return
        w = self.base_layer.weight
        w.data += self.delta_weight(self.active).to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data -= self.delta_weight(self.active).to(w.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.active is None or self.merged:
            return out
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        h = self.lora_dropout[self.active](x).to(a.weight.dtype)
        return out + (b(a(h)) * self.scaling[self.active]).to(out.dtype)


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in find_targets(model, cfg.target_modules):
        base = model.get_submodule(name)
        set_module(model, name, LoRALinear(base, adapter, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


class disabled:
    """Context manager: run the base model with every adapter switched off (no second copy)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for _, m in lora_layers(model)]

    def __enter__(self):
        self.saved = [m.active for m in self.layers]
        for m in self.layers:
            if m.merged:
                raise RuntimeError("cannot disable a merged adapter; unmerge it first")
            m.active = None

    def __exit__(self, *exc):
        for m, a in zip(self.layers, self.saved):
            m.active = a


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight and put the plain layer back."""
    for name, layer in lora_layers(model):
        layer.merge()
        set_module(model, name, layer.base_layer)
    return model
