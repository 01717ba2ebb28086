"""The data pipeline in one place: read files, turn rows into the objective's examples, split, and
plan batches. What a row means belongs to the objective (`example`); this module only reads, counts,
splits and batches."""
from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig
from unitune.data.files import DataError, Row, read_rows
from unitune.data.formats import NothingToLearn, template_roles
from unitune.data.packing import group_by_length, pack

# row, tokenizer, data config, roles the template renders -> an example, or None (dropped as too long)
ToExample = Callable[[Row, PreTrainedTokenizerBase, DataConfig, frozenset[str]], Any]


@dataclass
class DataBundle:
    train: list
    val: list
    stats: dict = field(default_factory=dict)


def generate_files(cfg: DataConfig) -> None:
    """Run the recipe's data generator (`module:function(out_dir)`) if the train/validation files are missing."""
    wanted = [Path(p) for p in (cfg.train, cfg.validation) if p]
    if not cfg.generator or all(p.exists() for p in wanted):
        return
    module, _, func = cfg.generator.partition(":")
    getattr(importlib.import_module(module), func)(wanted[0].parent)


def load_examples(path: str, cfg: DataConfig, tok: PreTrainedTokenizerBase, to_example: ToExample, stats: dict) -> list:
    rows = read_rows(path)
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    roles = template_roles(tok)
    examples, skipped = [], 0
    for r in rows:
        try:
            examples.append(to_example(r, tok, cfg, roles))
        except NothingToLearn as err:
            if cfg.nothing_to_learn == "error":
                raise DataError(f"{err} (or set data.nothing_to_learn=skip)") from None
            skipped += 1
    fitting = [e for e in examples if e is not None]  # None: too long, dropped by data.truncation
    kept = [e for e in fitting if e.n_loss > 0]
    stats["rows"] = stats.get("rows", 0) + len(rows)
    stats["skipped_nothing_to_learn"] = stats.get("skipped_nothing_to_learn", 0) + skipped
    stats["truncated"] = stats.get("truncated", 0) + sum(e.truncated for e in fitting)
    stats["dropped_too_long"] = stats.get("dropped_too_long", 0) + len(examples) - len(fitting)
    stats["dropped_no_loss_tokens"] = stats.get("dropped_no_loss_tokens", 0) + len(fitting) - len(kept)
    if not kept:
        raise DataError(
            f"{path}: no usable examples ({len(rows)} rows read; {stats['dropped_too_long']} longer than "
            f"data.max_length={cfg.max_length} dropped (data.truncation={cfg.truncation}); "
            f"{stats['dropped_no_loss_tokens']} have no tokens to learn from)"
        )
    return kept


def build_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, seed: int, to_example: ToExample) -> DataBundle:
    if not cfg.train:
        raise DataError("the recipe names no training data: set data.train to a file or directory")
    generate_files(cfg)
    stats: dict = {}
    train = load_examples(cfg.train, cfg, tok, to_example, stats)
    if cfg.validation:
        val = load_examples(cfg.validation, cfg, tok, to_example, {})
    elif cfg.val_ratio > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, int(len(train) * cfg.val_ratio))
        if n_val >= len(train):
            raise DataError(f"data.val_ratio={cfg.val_ratio} leaves no training rows out of {len(train)}")
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    else:
        val = []
    stats.update(train_examples=len(train), val_examples=len(val),
                 train_tokens=sum(e.length for e in train), loss_tokens=sum(e.n_loss for e in train))
    return DataBundle(train, val, stats)


class Batches:
    """A deterministic stream of micro-batches with a cursor, so a resumed run sees the same data.

    Examples are packed once; each epoch reorders the rows with a seed of (seed, epoch), so the
    number of batches per epoch is fixed and the cursor alone says where a checkpoint left off.
    """

    def __init__(self, examples: list, batch_size: int, packing: bool, max_length: int, pad_id: int, seed: int,
                 collate: Callable[..., dict]):
        self.examples, self.batch_size, self.packing, self.pad_id, self.seed = examples, batch_size, packing, pad_id, seed
        self.max_length = max_length
        self.collate = collate
        self.rows = pack(examples, max_length, seed) if packing else None
        self.cursor = 0
        self._epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[list[int]]]:
        if epoch != self._epoch:
            s = self.seed * 1000 + epoch
            rows = list(self.rows) if self.packing else group_by_length(self.examples, self.batch_size, s)
            if self.packing:
                random.Random(s).shuffle(rows)
            batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            if not self.packing:  # length groups stay together; their order is random
                random.Random(s).shuffle(batches)
            self._epoch, self._plan = epoch, batches
        return self._plan

    def __len__(self) -> int:
        return math.ceil(len(self.rows if self.packing else self.examples) / self.batch_size)

    def next(self) -> dict:
        epoch, i = divmod(self.cursor, len(self))
        self.cursor += 1
        return self.collate(self.examples, self.plan(epoch)[i], self.pad_id, self.packing, self.max_length)

    def all(self):
        """Every batch of one pass, in order (evaluation)."""
        for rows in self.plan(0):
            yield self.collate(self.examples, rows, self.pad_id, self.packing, self.max_length)
