"""Supervised fine-tuning: next-token cross-entropy on the tokens that carry loss.

The vocabulary projection is the largest activation of a small LM (tokens x 49k floats for
SmolLM2). We run the backbone, keep only the hidden states whose target carries loss (prompt
and padding tokens never reach the LM head), and project them in chunks whose logits are
recomputed in backward instead of stored. The projection is the model's own, post-processing
included (models/heads.py), so the loss is the one `model(..., labels=)` computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unitune.data.tokenize import IGNORE
from unitune.models import heads


def _chunk_loss(model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(heads.logits(model, h), y, reduction="sum")


def token_loss_sum(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    keep = targets != IGNORE
    h, y = hidden[keep], targets[keep]
    recompute = torch.is_grad_enabled() and len(h) > chunk
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(h), chunk):
        args = (model, h[i : i + chunk], y[i : i + chunk])
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute else _chunk_loss(*args))
    return total


MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


def loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 1024) -> tuple[torch.Tensor, dict]:
    heads.verify(model)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    hidden = heads.backbone(model)(**inputs, use_cache=False).last_hidden_state
    total = token_loss_sum(model, hidden, batch["targets"], chunk)
    return total, {"tokens": int((batch["targets"] != IGNORE).sum()), "seen_tokens": batch["real_tokens"]}
