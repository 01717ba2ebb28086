"""QLoRA: LoRA trained in full precision on a base frozen in 4-bit NF4 with double quantisation.

Every linear layer but the output head is stored as NF4 (unitune.methods.nf4, bitsandbytes'
layout), so the frozen linear weights take 0.26x their bf16 size. The adapter is created before
the base is quantized, so PiSSA/OLoRA init splits the full-precision weight and quantizes the
residual (QPiSSA). The saved adapter is a plain PEFT LoRA adapter: merge it into the original
full-precision model, not into the quantized one.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from unitune.methods import lora
from unitune.methods.nf4 import NF4Linear, quantize_model
from unitune.methods.targets import _output_layer_names, set_module

PEFT_TYPE = lora.PEFT_TYPE
adapter_state, config_from_peft = lora.adapter_state, lora.config_from_peft


class Config(lora.Config):
    name: Literal["qlora"] = "qlora"
    blocksize: int = Field(64, gt=0)  # weights per absmax scale
    double_quant: bool = True  # store the scales themselves in 8 bits


def lr_scale(cfg: Config, name, param) -> float:
    return lora.lr_scale(cfg, name, param)


def lora_config(cfg: Config) -> lora.Config:
    return lora.Config(**cfg.model_dump(exclude={"name", "blocksize", "double_quant"}))


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> nn.Module:
    model = lora.apply(model, lora_config(cfg), adapter)
    skip = _output_layer_names(model) | {n for n, _ in model.named_modules() if ".lora_" in n}
    quantize_model(model, skip, cfg.blocksize, cfg.double_quant)
    return model


def peft_config(cfg: Config, model: nn.Module) -> dict:
    return lora.peft_config(lora_config(cfg), model)


def dequantize_model(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            set_module(model, name, m.to_linear())
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Dequantize the base and fold the adapters in (the result carries the 4-bit rounding)."""
    return dequantize_model(lora.merge_and_unload(model))


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the NF4 layers take, parameters they hold): the base's 4-bit footprint."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.storage_bytes() for m in layers), sum(m.in_features * m.out_features for m in layers)


def footprint(model: nn.Module) -> str:
    nbytes, params = quantized_bytes(model)
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return (f"base linear layers in NF4: {params:,} weights in {nbytes / 2**20:.1f} MiB ({nbytes / (2 * params):.2f}x "
            f"their bf16 size); other frozen weights (embeddings, norms) {rest / 2**20:.1f} MiB")
