"""Batches: packed rows (several examples per row, no attention across their boundaries) or
padded batches of similar lengths.

Packed rows carry `position_ids` that restart at 0 for every example and no attention mask:
transformers then builds a block-diagonal causal mask from the position ids, so no example
sees another. Targets are shifted per example before packing, so no token learns to predict
the first token of the next example.

That mask is built (transformers 5, `masking_utils._preprocess_mask_arguments`) only when the
backbone gets `position_ids`, no attention mask and no cache, and its attention implementation
has a mask function (eager, sdpa, flex). Flash attention finds the boundaries in the position
ids itself, but only in a batch of one row. Layers that mix tokens outside attention (Mamba,
linear attention, convolutions) and backbones that take no `position_ids` (Bloom) carry one
example into the next. `packs_exactly` probes the model rather than keep a list of these.
"""
from __future__ import annotations

import random

import torch

from unitune.data.tokenize import IGNORE, Example
from unitune.models import heads


def pack(examples: list[Example], max_length: int, seed: int) -> list[list[int]]:
    """Group example indices into rows of at most max_length tokens (first-fit over a shuffle)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = examples[i].length
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
        part = sorted(order[c : c + chunk], key=lambda i: examples[i].length, reverse=True)
        rows += [[i] for i in part]
    return rows


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, packed: bool, max_length: int | None = None
            ) -> dict:
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


def packs_exactly(model: torch.nn.Module) -> bool | str:
    """True if a packed row gives each example the hidden states it has alone; otherwise why not.

    Two rows [a, b] and [c, b], a and c the same length: b must come out the same after either
    (nothing crosses the boundary) and the same as b alone (its positions restart).
    """
    with heads.probing(model) as device:
        a, c, b = (heads.probe_ids(model, n, stride, device) for n, stride in ((5, 5), (5, 11), (7, 3)))
        positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(device)
        body = heads.backbone(model)
        rows = body(input_ids=torch.stack([torch.cat([a, b]), torch.cat([c, b])]),
                    position_ids=positions.expand(2, -1), use_cache=False).last_hidden_state[:, len(a):]
        alone = body(input_ids=b[None], position_ids=positions[None, len(a):], use_cache=False).last_hidden_state[0]
    if (rows[0] - rows[1]).abs().max() > heads.tolerance(alone):
        return "an example's hidden states change with the example packed before it"
    if (rows[0] - alone).abs().max() > heads.tolerance(alone):
        return "a packed example's hidden states differ from its own, unpacked"
    return True
