"""QLoRA: LoRA trained in full precision on a base frozen in 4-bit NF4 with double quantisation.

Every linear layer is stored as NF4 (unitune.methods.quant, bitsandbytes' layout); the embedding
table and output head (one table when tied) in 8 bits by default, where 4 bits would cost the
head's logits accuracy. bitsandbytes leaves them at compute precision (`embeddings: keep`), but on
small models they are a large share of the weights: a fifth of SmolLM2-135M, whose whole frozen
base is 0.31x its bf16 size with 8-bit embeddings, 0.26x with `embeddings: nf4`, 0.63x with
`keep`. The base is quantized layer by layer as its weights are read (`layer_quantizer`, which
models.load_model calls), so a 7B model never exists at full precision. The adapters then wrap the
quantized layers, so DoRA's magnitudes are the norms of the weights the model computes with, as in
PEFT's QDoRA; PiSSA/OLoRA instead split each target's full-precision weight and quantize the
residual (QPiSSA), so those targets load at full precision. The saved adapter is a plain PEFT LoRA
adapter: merge it into the original full-precision model, not into the quantized one.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import ValidationInfo, field_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from unitune.methods import lora
from unitune.methods.quant import (INT8_BLOCKSIZES, NF4_BLOCKSIZES, QuantEmbedding, QuantLinear, QuantWeight,
                                   quantizable_embedding)
from unitune.methods.targets import set_module

PEFT_TYPE = lora.PEFT_TYPE
adapter_state, config_from_peft, lr_scale, disabled = lora.adapter_state, lora.config_from_peft, lora.lr_scale, lora.disabled


class Config(lora.Config):
    name: Literal["qlora"] = "qlora"
    double_quant: bool = True  # store the scales themselves in 8 bits
    embeddings: Literal["int8", "nf4", "keep"] = "int8"  # the embedding table and head (keep: as bitsandbytes)
    blocksize: int = 64  # weights per absmax scale

    @field_validator("blocksize")
    @classmethod
    def _bitsandbytes_blocksize(cls, blocksize: int, info: ValidationInfo) -> int:
        int8 = info.data.get("embeddings") == "int8"
        valid = INT8_BLOCKSIZES if int8 else NF4_BLOCKSIZES
        if blocksize not in valid:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, valid))}: the sizes bitsandbytes' "
                             + ("quantize_blockwise takes (the 8-bit embeddings: set embeddings: nf4 or keep for 32)"
                                if int8 else "quantize_4bit takes"))
        return blocksize


def lora_config(cfg: Config) -> lora.Config:
    return lora.Config(**cfg.model_dump(exclude={"name", "blocksize", "double_quant", "embeddings"}))


def layer_quantizer(cfg: Config, model: nn.Module) -> Callable[[str, nn.Module], nn.Module]:
    """How QLoRA stores each layer of `model`: given a layer's name and the layer with its full-precision
    weights, what takes its place. Called in model order, a head tied to the embedding right after it:
    models.load_model calls it on each layer as its weights are read, `apply` on any still unquantized."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    split = set(lora.targets(model, lora_config(cfg))) if cfg.init != "kaiming" else set()
    args, bits = (cfg.blocksize, cfg.double_quant), 4 if cfg.embeddings == "nf4" else 8
    tables: dict[int, QuantEmbedding] = {}  # by the id of the weight they hold: a head tied to one is that table

    def quantize(name: str, layer: nn.Module) -> nn.Module:
        if (isinstance(layer, QuantWeight) or ".lora_" in name or name in split
                or (cfg.embeddings == "keep" and (layer is emb or layer is head))):
            return layer
        if layer is emb:
            if not quantizable_embedding(layer):
                return layer
            tables[id(layer.weight)] = QuantEmbedding(layer, *args, bits=bits)
            return tables[id(layer.weight)]
        if layer is head:  # tied to the table: that table; tied to an embedding kept as it is: kept too
            if id(layer.weight) in tables:
                return tables[id(layer.weight)]
            if getattr(emb, "weight", None) is layer.weight or not isinstance(layer, nn.Linear):
                return layer
            return QuantLinear.from_layer(layer, *args, bits=bits)
        return QuantLinear.from_layer(layer, *args) if isinstance(layer, (nn.Linear, Conv1D)) else layer

    return quantize


def quantize_base(model: nn.Module, cfg: Config) -> nn.Module:
    """Store every layer still at full precision as QLoRA does (all of them, unless models.load_model
    streamed the weights in quantized)."""
    quantize = layer_quantizer(cfg, model)
    for name in [n for n, _ in model.named_modules(remove_duplicate=False)]:  # names: a layer is freed once replaced
        layer = model.get_submodule(name)
        if (stored := quantize(name, layer)) is not layer:
            set_module(model, name, stored)
    return model


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> nn.Module:
    if cfg.init != "kaiming":  # QPiSSA: the split needs the full-precision weight; its residual is quantized
        return quantize_base(lora.apply(model, lora_config(cfg), adapter), cfg)
    return lora.apply(quantize_base(model, cfg), lora_config(cfg), adapter)


def peft_config(cfg: Config, model: nn.Module) -> dict:
    return lora.peft_config(lora_config(cfg), model)


# lora's merge dequantizes a quantized base first; the result carries the 4-bit rounding
merge_and_unload = lora.merge_and_unload


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized layers take, weights they hold)."""
    layers = [m for m in model.modules() if isinstance(m, QuantWeight)]  # a tied table counts once
    return sum(m.storage_bytes() for m in layers), sum(m.in_features * m.out_features for m in layers)


def footprint(model: nn.Module) -> str:
    nbytes, weights = quantized_bytes(model)
    rest = [p for p in model.parameters() if not p.requires_grad]
    rest_bytes, total = sum(p.numel() * p.element_size() for p in rest), weights + sum(p.numel() for p in rest)
    return (f"frozen base: {weights:,} quantized weights take {nbytes / 2**20:.1f} MiB; {total - weights:,} others "
            f"(norms, biases{'' if any(isinstance(m, QuantEmbedding) for m in model.modules()) else ', embeddings'}) "
            f"{rest_bytes / 2**20:.1f} MiB; the whole frozen base is {(nbytes + rest_bytes) / (2 * total):.2f}x its bf16 size")
