"""Read rows from local files: JSONL, JSON, CSV, Parquet, or a `datasets` save_to_disk directory.

Every row keeps where it came from (file and line) so a bad one can be named precisely.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad data; the message names the file and line."""


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "file:line" (or "file:row N" where lines don't apply)


def read_rows(path: str | Path) -> list[Row]:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_datasets_dir(path)
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".tsv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unknown data file type '{suffix}'; use one of {', '.join(readers)}")
    return readers[suffix](path)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append(Row(obj, f"{path}:{n}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if err.lineno > 1 or err.msg == "Extra data":  # perhaps JSON Lines with a .json name
            try:
                return _read_jsonl(path)
            except DataError:
                pass
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(obj, dict):  # {"data": [...]} or a single split
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects (or one key holding such a list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of objects, got {type(obj).__name__}")
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(item).__name__}")
        rows.append(Row(item, f"{path}:record {i}"))
    return rows


def _read_csv(path: Path) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = []
        for rec in reader:
            if None in rec:
                raise DataError(f"{path}:{reader.line_num}: more fields than the header names")
            rows.append(Row(dict(rec), f"{path}:{reader.line_num}"))
    return rows


def _records(records: list[dict], path: Path) -> list[Row]:
    return [Row(r, f"{path}:row {i}") for i, r in enumerate(records)]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    return _records(pq.read_table(path).to_pylist(), path)


def _read_datasets_dir(path: Path) -> list[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a `datasets` directory saved with save_to_disk ({err})") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {list(ds)})")
        ds = ds["train"]
    return _records(ds.to_list(), path)
