"""Supervised fine-tuning: next-token cross-entropy on the tokens that carry loss.

The vocabulary projection is the largest activation of a small LM (tokens x 49k floats for
SmolLM2). We run the backbone, keep only the hidden states whose target carries loss (prompt
and padding tokens never reach the LM head), and project them in chunks whose logits are
recomputed in backward instead of stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unitune.data.tokenize import IGNORE


def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _chunk_loss(head: nn.Module, softcap: float | None, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    if softcap:  # Gemma-2/3 cap their logits: tanh(x / c) * c
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="sum")


def token_loss_sum(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    keep = targets != IGNORE
    h, y = hidden[keep], targets[keep]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    recompute = torch.is_grad_enabled() and len(h) > chunk
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(h), chunk):
        args = (head, softcap, h[i : i + chunk], y[i : i + chunk])
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute else _chunk_loss(*args))
    return total


MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


def loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 1024) -> tuple[torch.Tensor, dict]:
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    hidden = backbone(model)(**inputs, use_cache=False).last_hidden_state
    total = token_loss_sum(model, hidden, batch["targets"], chunk)
    return total, {"tokens": int((batch["targets"] != IGNORE).sum()), "seen_tokens": batch["real_tokens"]}
