"""The data pipeline in one place: read files, turn rows into the objective's examples, split, and
plan batches. What a row means belongs to the objective (`example`); this module only reads, counts,
splits and batches."""
from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig
from unitune.data import cache as data_cache
from unitune.engine.resume import file_digest
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


PARALLEL_ROWS = 4096  # below this, starting worker processes costs more than it saves
_job: tuple = ()  # what forked workers convert: (rows, cfg, tok, to_example, roles), inherited, not pickled


def _convert(rows: list[Row], cfg: DataConfig, tok, to_example: ToExample, roles) -> tuple[list, int]:
    """The rows' examples (None: too long, dropped), and how many rows had nothing to learn."""
    examples, skipped = [], 0
    for r in rows:
        try:
            examples.append(to_example(r, tok, cfg, roles))
        except NothingToLearn as err:
            if cfg.nothing_to_learn == "error":
                raise DataError(f"{err} (or set data.nothing_to_learn=skip)") from None
            skipped += 1
    return examples, skipped


def _convert_span(span: tuple[int, int]) -> tuple[list, int]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker process
    rows, *job = _job
    return _convert(rows[span[0] : span[1]], *job)


def _convert_all(rows: list[Row], cfg: DataConfig, tok, to_example: ToExample, roles) -> tuple[list, int]:
    """_convert, in worker processes (forked: they inherit the rows and the tokenizer) for large files."""
    procs = min(cfg.num_proc or os.cpu_count() or 1, max(1, len(rows) // PARALLEL_ROWS))
    if procs < 2:
        return _convert(rows, cfg, tok, to_example, roles)
    global _job
    _job = (rows, cfg, tok, to_example, roles)
    size = -(-len(rows) // (procs * 4))  # a few spans per worker: an uneven one does not hold the rest up
    try:
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_convert_span, [(i, i + size) for i in range(0, len(rows), size)]))
    finally:
        _job = ()
    return [e for examples, _ in parts for e in examples], sum(n for _, n in parts)


def load_examples(path: str, cfg: DataConfig, tok: PreTrainedTokenizerBase, to_example: ToExample, stats: dict,
                  cache: bool = False) -> list:
    """The file's examples and their counts (added to `stats`); read from the cache when `cache` and the same
    file, tokenizer and settings made them before (data/cache.py)."""
    name = data_cache.key(str(path), file_digest(Path(path).expanduser()), cfg, tok, to_example) \
        if cache and Path(path).expanduser().exists() else None
    if name and (hit := data_cache.load(name)):
        examples, counts = hit
    else:
        examples, counts = _read_examples(path, cfg, tok, to_example)
        if name:
            data_cache.save(name, examples, counts)
    for k, v in counts.items():
        stats[k] = stats.get(k, 0) + v
    return examples


def _read_examples(path: str, cfg: DataConfig, tok, to_example: ToExample) -> tuple[list, dict]:
    rows = read_rows(path)
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    rows, scrubbed = _scrubbed(rows, cfg, path) if cfg.scrub else (rows, {})
    examples, skipped = _convert_all(rows, cfg, tok, to_example, template_roles(tok))
    fitting = [e for e in examples if e is not None]  # None: too long, dropped by data.truncation
    kept = [e for e in fitting if e.n_loss > 0]
    counts = {"rows": len(rows), "skipped_nothing_to_learn": skipped, "truncated": sum(e.truncated for e in fitting),
              "dropped_too_long": len(examples) - len(fitting), "dropped_no_loss_tokens": len(fitting) - len(kept),
              **scrubbed}
    if not kept:
        raise DataError(
            f"{path}: no usable examples ({len(rows)} rows read; {counts['dropped_too_long']} longer than "
            f"data.max_length={cfg.max_length} dropped (data.truncation={cfg.truncation}); "
            f"{counts['dropped_no_loss_tokens']} have no tokens to learn from)"
        )
    return kept, counts


def _scrubbed(rows: list[Row], cfg: DataConfig, path: str) -> tuple[list[Row], dict]:
    """data.scrub: personal data replaced before tokenizing. Only the counts are printed and kept in the stats,
    never a sample: logs and reports travel further than the data."""
    from unitune.privacy import scrub

    rows, report = scrub.scrub_rows(rows, scrub.resolve(cfg.scrub, cfg.scrub_names_model), sample=0)
    left_out = f"; not scrubbed: {report['setting']['left_out']}" if report["setting"]["left_out"] else ""
    print(f"unitune: scrub: {path}: " + ", ".join(f"{k} {n}" for k, n in report["counts"].items()) + left_out,
          flush=True)
    return rows, {f"scrubbed_{k}": n for k, n in report["counts"].items()}


def build_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, seed: int, to_example: ToExample) -> DataBundle:
    if not cfg.train:
        raise DataError("the recipe names no training data: set data.train to a file or directory")
    generate_files(cfg)
    stats: dict = {}
    train = load_examples(cfg.train, cfg, tok, to_example, stats, cfg.cache)
    if cfg.validation:
        val = load_examples(cfg.validation, cfg, tok, to_example, {}, cfg.cache)
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
        # (rank, processes): under data parallelism each process collates its share of every planned batch,
        # rows rank, rank + processes, ...; the plan itself is the same everywhere (engine/distributed.py)
        self.shard = (0, 1)

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
        rows = self.plan(epoch)[i]
        rank, processes = self.shard
        mine = rows[rank::processes]
        if not mine:  # a short last batch leaves this process nothing: it computes a row, weighted 0, to stay in step
            return {**self.collate(self.examples, rows[:1], self.pad_id, self.packing, self.max_length), "ghost": True}
        return self.collate(self.examples, mine, self.pad_id, self.packing, self.max_length)

    def all(self):
        """Every batch of one pass, in order (evaluation); this process's share of each, under data parallelism."""
        rank, processes = self.shard
        for rows in self.plan(0):
            if mine := rows[rank::processes]:
                yield self.collate(self.examples, mine, self.pad_id, self.packing, self.max_length)
