"""Supervised fine-tuning: next-token cross-entropy on the tokens that carry loss (the assistant's
turns, or every token of plain text), summed; a step normalises by the loss tokens of all its
micro-batches.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig, Section
from unitune.data.files import Row
from unitune.data import packing
from unitune.data.formats import to_sample
from unitune.data.tokenize import IGNORE, Example, tokenize_sample
from unitune.objectives.logprobs import hidden_states, token_logps

PACKS = True
collate = packing.collate


class Config(Section):
    name: Literal["sft"] = "sft"
    loss_chunk: int = Field(1024, gt=0)  # loss tokens per vocabulary-projection chunk


def example(row: Row, tok: PreTrainedTokenizerBase, data: DataConfig, roles: frozenset[str]) -> Example | None:
    sample = to_sample(row, data.format, data.system_prompt, roles)
    return tokenize_sample(tok, sample, data.max_length, data.loss_on, data.truncation)


def count(batch: dict) -> int:
    return int((batch["targets"] != IGNORE).sum())


def loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    total = -token_logps(model, hidden_states(model, batch), batch["targets"], cfg.loss_chunk).sum()
    return total, {"seen_tokens": batch["real_tokens"]}


def summarize(means: dict) -> dict:
    return {"val_ppl": math.exp(min(means["val_loss"], 50.0))}
