"""Supervised fine-tuning: next-token cross-entropy on the tokens that carry loss (the assistant's
turns, or every token of plain text), summed; a step normalises by the loss tokens of all its
micro-batches.

`kl_to_base` > 0 adds, at the same tokens, beta * KL(base || tuned) over the whole vocabulary: the tuned model
keeps the base model's next-token distribution where the task does not need it changed (distillation from
the base, as Learning without Forgetting does), a mitigation of forgetting. The base is the model with its
adapters off (no second copy; full fine-tuning keeps a frozen copy).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig, Section
from unitune.data.files import Row
from unitune.data import packing
from unitune.data.formats import to_sample
from unitune.data.tokenize import IGNORE, Example, tokenize_sample
from unitune.models import heads
from unitune.objectives.logprobs import hidden_states, token_logps

PACKS = True
collate = packing.collate


class Config(Section):
    name: Literal["sft"] = "sft"
    loss_chunk: int = Field(1024, gt=0)  # loss tokens per vocabulary-projection chunk
    kl_to_base: float = Field(0.0, ge=0)  # forgetting: weight of KL(base || tuned) at the loss tokens


def needs_ref(cfg: Config) -> bool:
    return cfg.kl_to_base > 0


def example(row: Row, tok: PreTrainedTokenizerBase, data: DataConfig, roles: frozenset[str]) -> Example | None:
    sample = to_sample(row, data.format, data.system_prompt, roles)
    return tokenize_sample(tok, sample, data.max_length, data.loss_on, data.truncation)


def count(batch: dict) -> int:
    return int((batch["targets"] != IGNORE).sum())


def loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    hidden = hidden_states(model, batch)
    total = -token_logps(model, hidden, batch["targets"], cfg.loss_chunk).sum()
    info = {"seen_tokens": batch["real_tokens"]}
    if cfg.kl_to_base and ref is not None:
        kl = kl_to_base(model, hidden, batch, ref, cfg.loss_chunk)
        info |= {"ce": total.detach(), "kl_to_base": kl.detach()}
        if torch.is_grad_enabled():  # evaluation's val_loss stays the cross-entropy, comparable across runs
            total = total + cfg.kl_to_base * kl
    return total, info


def _chunk_kl(model: nn.Module, h: torch.Tensor, base_h: torch.Tensor, ref) -> torch.Tensor:
    with torch.no_grad(), ref() as base:  # base logits inside the reference context (adapters off)
        base_logps = F.log_softmax(heads.logits(base, base_h).float(), -1)
    logps = F.log_softmax(heads.logits(model, h).float(), -1)
    return (base_logps.exp() * (base_logps - logps)).sum()


def kl_to_base(model: nn.Module, hidden: torch.Tensor, batch: dict, ref, chunk: int) -> torch.Tensor:
    """Sum over the loss tokens of KL(base || model), chunked; each chunk's two vocabulary projections are
    recomputed in backward rather than kept (tokens x vocabulary floats each)."""
    keep = batch["targets"] != IGNORE
    with torch.no_grad(), ref() as base:
        base_hidden = hidden_states(base, batch)[keep]
    h = hidden[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(h), chunk):
        args = (model, h[i : i + chunk], base_hidden[i : i + chunk], ref)
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_kl(*args))
    return total


def summarize(means: dict) -> dict:
    return {"val_ppl": math.exp(min(means["val_loss"], 50.0))}
