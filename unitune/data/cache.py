"""Tokenized examples cached on disk, so the second run of a recipe starts in seconds (`data.cache`).

A data file's examples are stored once as an Arrow IPC file under ~/.cache/unitune/data (`UNITUNE_CACHE` or
`XDG_CACHE_HOME` move it), keyed by everything that shapes them: the file's path as given (examples name
their `file:line`) and content (not its date), the tokenizer (its vocabulary, merges, special tokens and chat template), the data fields that change an
example (format, max_length, truncation, loss_on, system_prompt, ...; data.scrub as it resolves on this machine),
the objective's example function and unitune's cache version. Any change is a new key; nothing stale is ever
read. A cache file is written under a temp name and renamed in whole, so a kill leaves no half-written entry.
It is read memory-mapped. Image data is not cached (images are decoded, not tokenized).

The examples are dataclasses (data/tokenize.py, data/preference.py): their token-id fields are stored as Arrow
lists of int32, scalars as themselves, anything else (a conversation) as JSON text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from unitune import __version__, atomic

VERSION = 1
# the data config fields that change what an example is (not which examples are used, or how they are batched)
SHAPING = ("format", "max_length", "truncation", "nothing_to_learn", "loss_on", "system_prompt", "max_examples")


def root() -> Path:
    if os.environ.get("UNITUNE_CACHE"):
        return Path(os.environ["UNITUNE_CACHE"]).expanduser() / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "unitune" / "data"


def _tokenizer_digest(tok) -> bytes:
    backend = getattr(tok, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True),
             str(tok.chat_template), json.dumps(tok.special_tokens_map, sort_keys=True, default=str),
             str(getattr(tok, "add_bos_token", None)), str(getattr(tok, "add_eos_token", None))]
    return hashlib.sha256("\0".join(parts).encode()).digest()


def key(path: str, file_digest: str, cfg, tok, to_example) -> str | None:
    """The entry's name, or None where nothing is cached (an image processor in the tokenizer's place)."""
    if not isinstance(tok, PreTrainedTokenizerBase):
        return None
    h = hashlib.sha256(f"{VERSION} {__version__} {to_example.__module__}.{to_example.__qualname__}".encode())
    h.update(f"{path}\0{file_digest}".encode())
    h.update(json.dumps({k: getattr(cfg, k) for k in SHAPING}, sort_keys=True, default=str).encode())
    if cfg.scrub:  # as it resolves here: a names pipeline installed later must not read rows scrubbed without it
        from unitune.privacy.scrub import resolve

        h.update(json.dumps(resolve(cfg.scrub, cfg.scrub_names_model), sort_keys=True).encode())
    h.update(_tokenizer_digest(tok))
    return h.hexdigest()[:40]


def _is_ids(values: list) -> bool:
    sample = next((v for v in values if v is not None), None)
    return isinstance(sample, list) and all(isinstance(x, int) for x in sample[:8])


def save(name: str, examples: list, stats: dict) -> Path | None:
    """Write the examples (all of one dataclass) and the counts reading them gave; None where they do not fit."""
    cls = type(examples[0])
    if not dataclasses.is_dataclass(cls) or any(type(e) is not cls for e in examples) or \
            not cls.__module__.startswith("unitune."):
        return None
    columns, encoded = {}, []
    # the fields, and what an objective attached beside them (the conversation a pair's prompt came from)
    attributes = list(dict.fromkeys(a for e in examples for a in vars(e)))
    for a in attributes:
        values = [getattr(e, a, None) for e in examples]
        if _is_ids(values):
            columns[a] = pa.array(values, pa.list_(pa.int32()))
        elif all(v is None or type(v) in (bool, int, float, str) for v in values):
            columns[a] = pa.array(values)
        else:
            columns[a] = pa.array([json.dumps(v) for v in values], pa.string())
            encoded.append(a)
    meta = {"class": f"{cls.__module__}:{cls.__qualname__}", "json": json.dumps(encoded), "stats": json.dumps(stats)}
    table = pa.table(columns).replace_schema_metadata(meta)
    path = root() / f"{name}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temp_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def load(name: str) -> tuple[list, dict] | None:
    """The cached examples and counts, or None (no entry, or one this version cannot read)."""
    path = root() / f"{name}.arrow"
    if not path.is_file():
        return None
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        module, _, qualname = meta["class"].partition(":")
        if not module.startswith("unitune."):
            return None
        cls = getattr(importlib.import_module(module), qualname)
        encoded = set(json.loads(meta["json"]))
        columns = {n: ([json.loads(v) for v in table.column(n).to_pylist()] if n in encoded
                       else table.column(n).to_pylist()) for n in table.column_names}
    except (pa.ArrowInvalid, KeyError, AttributeError, ImportError, json.JSONDecodeError, OSError):
        return None  # unreadable (a foreign or damaged file): tokenize again and replace it
    fields = {f.name for f in dataclasses.fields(cls)}
    examples = []
    for values in zip(*columns.values()):
        row = dict(zip(columns, values))
        example = cls(**{k: v for k, v in row.items() if k in fields})
        for k in row.keys() - fields:
            if row[k] is not None:  # an attribute some examples have and others lack
                setattr(example, k, row[k])
        examples.append(example)
    return examples, json.loads(meta["stats"])
