"""Prefix tuning (Li & Liang, 2021): n trained keys and values in front of every attention layer.

The prefix is one table of shape (n, layers * 2 * kv_heads * head_dim) in PEFT's layout,
optionally produced by a two-layer tanh MLP (`projection`, the paper's reparameterisation, which
steadies training; the saved adapter is its output). `init: vocab` starts the table from the
keys and values the frozen model computes for n common tokens (the paper's "real words"
initialisation); `init: random` is PEFT's N(0, 1).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from unitune.config import Section
from unitune.methods import virtual
from unitune.methods.virtual import KEY_PREFIX, PACKING, adapter_state, merge_and_unload  # noqa: F401

PEFT_TYPE = "PREFIX_TUNING"


class Config(Section):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0)
    projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0)  # the projection MLP's width; default: hidden size
    init: Literal["vocab", "random"] = "vocab"


class PrefixEncoder(nn.Module):
    def __init__(self, table: torch.Tensor, shape: dict, cfg: Config):
        super().__init__()
        self.num_virtual_tokens, self.shape = table.shape[0], shape
        width = shape["kv_heads"] * shape["head_dim"]
        if cfg.projection:  # the MLP maps a (n, width) embedding to the whole table
            hidden = cfg.encoder_hidden_size or shape["hidden"]
            self.embedding = nn.Embedding(self.num_virtual_tokens, width, device=table.device)
            self.transform = nn.Sequential(nn.Linear(width, hidden, device=table.device), nn.Tanh(),
                                           nn.Linear(hidden, table.shape[1], device=table.device))
        else:
            self.embedding = nn.Embedding.from_pretrained(table.float().clone(), freeze=False)
            self.transform = None

    def table(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w

    def forward(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s, n = self.shape, self.num_virtual_tokens
        # PEFT's layout: (n, layers*2, heads, head_dim), K and V of layer i at 2i and 2i+1.
        kv = self.table().view(n, s["layers"] * 2, s["kv_heads"], s["head_dim"]).permute(1, 2, 0, 3)
        kv = kv[:, None].expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(s["layers"])]


@torch.no_grad()
def vocab_table(model: nn.Module, n: int) -> torch.Tensor:
    """Keys and values of n common tokens, as the frozen model computes them, in PEFT's layout."""
    ids = virtual.sample_vocab(model, n, torch.Generator().manual_seed(0))
    device = model.get_input_embeddings().weight.device
    cache = virtual.backbone(model)(input_ids=ids[None].to(device), use_cache=True).past_key_values
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, heads, n, hd)
    return torch.stack(per_layer).permute(3, 0, 1, 2, 4).reshape(n, -1).float()


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    shape = virtual.dims(model)
    n = cfg.num_virtual_tokens
    width = shape["layers"] * 2 * shape["kv_heads"] * shape["head_dim"]
    device = model.get_input_embeddings().weight.device
    if cfg.init == "vocab" and not cfg.projection:
        table = vocab_table(model, n)
    else:
        table = torch.randn(n, width, generator=torch.Generator().manual_seed(0)).to(device)
    return virtual.attach(model, PrefixEncoder(table, shape, cfg), "prefix")


def peft_config(cfg: Config, model: nn.Module) -> dict:
    d = virtual.dims(model)
    # PEFT counts the KV heads as the prefix's heads for grouped-query attention.
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": d["kv_heads"] * d["head_dim"],
            "num_transformer_submodules": 1, "num_attention_heads": d["kv_heads"], "num_layers": d["layers"],
            "prefix_projection": cfg.projection, "encoder_hidden_size": cfg.encoder_hidden_size or d["hidden"]}


def config_from_peft(raw: dict, where) -> Config:
    return Config(num_virtual_tokens=raw["num_virtual_tokens"], projection=False, init="random")
