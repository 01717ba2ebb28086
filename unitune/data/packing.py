"""Batches: packed rows (several examples per row, no attention across their boundaries) or
padded batches of similar lengths.

Packed rows carry `position_ids` that restart at 0 for every example and no attention mask:
transformers then builds a block-diagonal causal mask from the position ids, so no example
sees another. Targets are shifted per example before packing, so no token learns to predict
the first token of the next example.
"""
from __future__ import annotations

import random

import torch

from unitune.data.tokenize import IGNORE, Example


def pack(examples: list[Example], max_length: int, seed: int) -> list[list[int]]:
    """Group example indices into rows of at most max_length tokens (first-fit over a shuffle)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        # First fit among the last few open rows: nearly full rows with little search.
        for r in range(max(0, len(rows) - 8), len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def group_by_length(examples: list[Example], batch_size: int, seed: int) -> list[list[int]]:
    """One example per row, rows sorted by length inside shuffled chunks: little padding, random order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chunk = batch_size * 32
    rows = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c : c + chunk], key=lambda i: len(examples[i].input_ids), reverse=True)
        rows += [[i] for i in part]
    return rows


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, packed: bool) -> dict:
    """Tensors for a batch of rows; pad positions carry no loss."""
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            ex = examples[i]
            n = len(ex.input_ids)
            ids[r, t : t + n] = torch.tensor(ex.input_ids)
            targets[r, t : t + n] = torch.tensor(ex.targets)
            positions[r, t : t + n] = torch.arange(n)
            attn[r, t : t + n] = 1
            t += n
        if packed and t < width:  # the padding tail is one more (ignored) sequence of its own
            positions[r, t:] = torch.arange(width - t)
    batch = {"input_ids": ids, "targets": targets, "position_ids": positions, "real_tokens": int(attn.sum())}
    if not packed:
        batch["attention_mask"] = attn
    return batch
