"""IA3: learned vectors that rescale keys, values and feed-forward activations (Liu et al., 2022).

Attention targets scale the layer's output, y = l ⊙ (W x); feed-forward targets scale its input,
y = W (l ⊙ x). The vectors start at one, so training starts at the base model. Shapes, init and
key names follow PEFT's IA3 layer, so adapters move between the two tools.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from unitune.config import Section
from unitune.methods.targets import find_targets, matches, set_module

PEFT_TYPE = "IA3"


class Config(Section):
    name: Literal["ia3"] = "ia3"
    target_modules: str | list[str] = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: str | list[str] = ["down_proj"]  # these scale their input, the others their output


class IA3Linear(nn.Module):
    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base
        self.feedforward = feedforward
        w = base.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if isinstance(base, Conv1D) else (w.shape[1], w.shape[0])
        shape = (1, in_f) if feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))
        out = self.base_layer(x)
        return (out * scale).to(out.dtype)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    model.requires_grad_(False)
    for name in find_targets(model, cfg.target_modules):
        set_module(model, name, IA3Linear(model.get_submodule(name), matches(name, cfg.feedforward_modules)))
    return model


def layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.ia3_l": m.ia3_l for n, m in layers(model)}


def peft_config(cfg: Config, model: nn.Module) -> dict:
    leaves = lambda ms: sorted({n.rsplit(".", 1)[-1] for n, m in ms})  # noqa: E731
    return {"target_modules": leaves(layers(model)),
            "feedforward_modules": leaves([(n, m) for n, m in layers(model) if m.feedforward]),
            "fan_in_fan_out": any(isinstance(m.base_layer, Conv1D) for _, m in layers(model)),
            "init_ia3_weights": True}


def config_from_peft(raw: dict, where) -> Config:
    return Config(target_modules=raw["target_modules"], feedforward_modules=raw.get("feedforward_modules") or [])


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the vectors into the weights: scaling W's columns (input) or rows (output)."""
    with torch.no_grad():
        for name, m in layers(model):
            w, scale = m.base_layer.weight, m.ia3_l.flatten().to(m.base_layer.weight.dtype)
            conv1d = isinstance(m.base_layer, Conv1D)  # weight is (in, out)
            if m.feedforward:
                w.mul_(scale[:, None] if conv1d else scale[None, :])
            else:
                w.mul_(scale[None, :] if conv1d else scale[:, None])
                if m.base_layer.bias is not None:
                    m.base_layer.bias.mul_(scale)
            set_module(model, name, m.base_layer)
    return model
