"""Prompt tuning (Lester et al., 2021): n trained embeddings in front of every input, nothing else.

The soft tokens start as the embeddings of a text (`init_text`, repeated or cut to n tokens), of
common vocabulary tokens (`init: vocab`), or N(0, 1) as PEFT's RANDOM. Saves as PEFT's
PROMPT_TUNING adapter (the `prompt_embeddings` table).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from unitune.config import Section
from unitune.methods import virtual
from unitune.methods.virtual import KEY_PREFIX, PACKING, adapter_state, merge_and_unload  # noqa: F401

PEFT_TYPE = "PROMPT_TUNING"


class Config(Section):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["vocab", "text", "random"] = "vocab"
    init_text: str | None = None  # with init: text

    @model_validator(mode="after")
    def _text(self):
        if (self.init == "text") != bool(self.init_text):
            raise ValueError("init: text needs init_text (and init_text needs init: text)")
        return self


class PromptEmbedding(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.num_virtual_tokens = table.shape[0]
        self.embedding = nn.Embedding.from_pretrained(table.float().clone(), freeze=False)

    def table(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, batch: int) -> torch.Tensor:
        return self.table()[None].expand(batch, -1, -1)


def initial_table(model: nn.Module, n: int, init: str, text: str | None = None, tokenizer=None) -> torch.Tensor:
    words = model.get_input_embeddings().weight.detach()
    if init == "random":
        return torch.randn(n, words.shape[1], generator=torch.Generator().manual_seed(0), device="cpu").to(words.device)
    if init == "text":
        if tokenizer is None:
            raise ValueError("init: text needs the model's tokenizer")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = (ids * (n // max(len(ids), 1) + 1))[:n]
    else:
        ids = virtual.sample_vocab(model, n, torch.Generator().manual_seed(0)).tolist()
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)  # Gemma scales embeddings on lookup
    table = words[torch.tensor(ids, device=words.device)]
    return table * scale if scale is not None else table


def apply(model: nn.Module, cfg: Config, tokenizer=None) -> nn.Module:
    table = initial_table(model, cfg.num_virtual_tokens, cfg.init, cfg.init_text, tokenizer)
    return virtual.attach(model, PromptEmbedding(table), "embeddings")


def peft_config(cfg: Config, model: nn.Module) -> dict:
    d = virtual.dims(model)
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": d["hidden"], "num_transformer_submodules": 1,
            "num_attention_heads": d["heads"], "num_layers": d["layers"], "prompt_tuning_init": "RANDOM"}


def config_from_peft(raw: dict, where) -> Config:
    return Config(num_virtual_tokens=raw["num_virtual_tokens"], init="random")
