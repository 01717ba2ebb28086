"""QLoRA: LoRA trained in full precision on a base frozen in 4-bit NF4 with double quantisation.

Every linear layer is stored as NF4 (unitune.methods.quant, bitsandbytes' layout); the embedding
table and output head (one table when tied) in 8 bits by default, where 4 bits would cost the
head's logits accuracy. bitsandbytes leaves them at compute precision (`embeddings: keep`), but on
small models they are a large share of the weights: a fifth of SmolLM2-135M, whose whole frozen
base is 0.31x its bf16 size with 8-bit embeddings, 0.26x with `embeddings: nf4`, 0.63x with
`keep`. The adapter is created before the base is quantized, so PiSSA/OLoRA init splits the
full-precision weight and quantizes the residual (QPiSSA). The saved adapter is a plain PEFT LoRA adapter: merge it into the original
full-precision model, not into the quantized one.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from unitune.methods import lora
from unitune.methods.quant import QuantEmbedding, QuantLinear, quantize_embeddings, quantize_model
from unitune.methods.targets import output_layer_names, set_module

PEFT_TYPE = lora.PEFT_TYPE
adapter_state, config_from_peft, lr_scale = lora.adapter_state, lora.config_from_peft, lora.lr_scale


class Config(lora.Config):
    name: Literal["qlora"] = "qlora"
    blocksize: int = Field(64, gt=0)  # weights per absmax scale
    double_quant: bool = True  # store the scales themselves in 8 bits
    embeddings: Literal["int8", "nf4", "keep"] = "int8"  # the embedding table and head (keep: as bitsandbytes)


def lora_config(cfg: Config) -> lora.Config:
    return lora.Config(**cfg.model_dump(exclude={"name", "blocksize", "double_quant", "embeddings"}))


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> nn.Module:
    model = lora.apply(model, lora_config(cfg), adapter)
    skip = output_layer_names(model) | {n for n, _ in model.named_modules() if ".lora_" in n}
    quantize_model(model, skip, cfg.blocksize, cfg.double_quant)
    if cfg.embeddings != "keep":
        quantize_embeddings(model, cfg.blocksize, cfg.double_quant, bits=4 if cfg.embeddings == "nf4" else 8)
    return model


def peft_config(cfg: Config, model: nn.Module) -> dict:
    return lora.peft_config(lora_config(cfg), model)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Full-precision layers back in place of the NF4 ones (a tied embedding and head tied again)."""
    plain: dict[int, nn.Module] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, QuantLinear):
            if id(m) not in plain:
                plain[id(m)] = m.to_embedding() if isinstance(m, QuantEmbedding) else m.to_linear()
            set_module(model, name, plain[id(m)])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Embedding):  # it was the tied table: a Linear over the same weight
        linear = nn.Linear(head.embedding_dim, head.num_embeddings, bias=False, device=head.weight.device)
        linear.weight = head.weight
        model.set_output_embeddings(linear)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Dequantize the base and fold the adapters in (the result carries the 4-bit rounding)."""
    return dequantize_model(lora.merge_and_unload(model))


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized layers take, weights they hold)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]  # a tied table counts once
    return sum(m.storage_bytes() for m in layers), sum(m.in_features * m.out_features for m in layers)


def footprint(model: nn.Module) -> str:
    nbytes, weights = quantized_bytes(model)
    rest = [p for p in model.parameters() if not p.requires_grad]
    rest_bytes, total = sum(p.numel() * p.element_size() for p in rest), weights + sum(p.numel() for p in rest)
    return (f"frozen base: {weights:,} quantized weights take {nbytes / 2**20:.1f} MiB; {total - weights:,} others "
            f"(norms, biases{'' if any(isinstance(m, QuantEmbedding) for m in model.modules()) else ', embeddings'}) "
            f"{rest_bytes / 2**20:.1f} MiB; the whole frozen base is {(nbytes + rest_bytes) / (2 * total):.2f}x its bf16 size")
