"""P-tuning (Liu et al., 2021): virtual-token embeddings produced by a trained prompt encoder.

The encoder is PEFT's: an embedding table fed through an MLP (3 layers, ReLU) or a bidirectional
LSTM with an MLP head. It is only a reparameterisation for training: the saved adapter is the
encoder's output table (PEFT's P_TUNING format), which loads as a plain prompt.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from unitune.config import Section
from unitune.methods import virtual
from unitune.methods.virtual import KEY_PREFIX, PACKING, adapter_state, merge_and_unload  # noqa: F401

PEFT_TYPE = "P_TUNING"


class Config(Section):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, gt=0)
    encoder: Literal["mlp", "lstm", "none"] = "mlp"  # none: the table itself (what a saved adapter loads as)
    encoder_hidden_size: int | None = Field(None, gt=0)  # default: the model's hidden size
    encoder_num_layers: int = Field(2, gt=0)  # LSTM layers
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class PromptEncoder(nn.Module):
    def __init__(self, n: int, dim: int, cfg: Config, device=None):
        super().__init__()
        self.num_virtual_tokens, self.kind = n, cfg.encoder
        hidden = cfg.encoder_hidden_size or dim
        self.embedding = nn.Embedding(n, dim, device=device)
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, device=device))
        elif cfg.encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, dim, device=device))

    def table(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.kind == "lstm":
            return self.mlp_head(self.lstm_head(x[None])[0])[0]
        return self.mlp_head(x) if self.kind == "mlp" else x

    def forward(self, batch: int) -> torch.Tensor:
        return self.table()[None].expand(batch, -1, -1)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    dim = virtual.dims(model)["hidden"]
    device = model.get_input_embeddings().weight.device
    return virtual.attach(model, PromptEncoder(cfg.num_virtual_tokens, dim, cfg, device), "embeddings")


def peft_config(cfg: Config, model: nn.Module) -> dict:
    d = virtual.dims(model)
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": d["hidden"], "num_transformer_submodules": 1,
            "num_attention_heads": d["heads"], "num_layers": d["layers"],
            "encoder_reparameterization_type": "LSTM" if cfg.encoder == "lstm" else "MLP",
            "encoder_hidden_size": cfg.encoder_hidden_size or d["hidden"]}


def config_from_peft(raw: dict, where) -> Config:
    return Config(num_virtual_tokens=raw["num_virtual_tokens"], encoder="none")
