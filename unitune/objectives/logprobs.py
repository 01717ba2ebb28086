"""Log-probabilities of the tokens that carry loss, without the vocabulary projection of the rest.

The vocabulary projection is the largest activation of a small LM (tokens x 49k floats for
SmolLM2). Only hidden states whose target carries loss reach the LM head (prompt and padding
tokens never do), in chunks whose logits are recomputed in backward instead of stored. The
projection is the model's own, post-processing included (models/heads.py), so these are the
log-probabilities `model(...)` gives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unitune.data.tokenize import IGNORE
from unitune.models import heads

MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    heads.verify(model)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return heads.backbone(model)(**inputs, use_cache=False).last_hidden_state


def _chunk_logps(model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(heads.logits(model, h), y, reduction="none")


def token_logps(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target) at every position whose target carries loss, in row-major order."""
    keep = targets != IGNORE
    h, y = hidden[keep], targets[keep]
    recompute = torch.is_grad_enabled() and len(h) > chunk
    parts = []
    for i in range(0, len(h), chunk):
        args = (model, h[i : i + chunk], y[i : i + chunk])
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if recompute else _chunk_logps(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's loss tokens, number of them): one value per batch row."""
    targets = batch["targets"]
    lp = token_logps(model, hidden_states(model, batch), targets, chunk)
    rows = (targets != IGNORE).nonzero()[:, 0]
    sums = lp.new_zeros(len(targets)).index_add(0, rows, lp)
    return sums, (targets != IGNORE).sum(1)
