"""Read rows from local files: JSONL, JSON, CSV/TSV, Parquet, a `datasets` save_to_disk directory, an image
folder (one subfolder of images per class: rows of `image` path and `label`), or COCO annotations (data/coco.py).
Rows go back to JSONL, JSON, CSV/TSV or Parquet with `write_rows` (`unitune scrub`).

Every row keeps where it came from (file and line) so a bad one can be named precisely. Text files
must be UTF-8, with or without a byte-order mark; JSON is read strictly (no duplicate keys, no NaN),
because what Python's `json` lets through silently, the next tool in a user's pipeline reads differently.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import json.decoder
import json.scanner
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitune import atomic


class DataError(ValueError):
    """Bad data; the message names the file and line."""


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "file:line" (or "file:row N" where lines don't apply)
    columns: str | None = None  # tabular files: "file.csv: header has columns [...]", for errors about a column
    file: Path | None = None  # the file it was read from (relative image paths resolve against its folder)


def read_rows(path: str | Path) -> list[Row]:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        rows = _read_image_folder(path) if is_image_folder(path) else _read_datasets_dir(path)
    else:
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_json, ".ndjson": _read_json, ".json": _read_json, ".csv": _read_csv,
                   ".tsv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"{path}: unknown data file type '{suffix}'; use one of {', '.join(readers)}")
        rows = readers[suffix](path)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty, or has only a header); add examples or name another file")
    for r in rows:
        r.file = path
    return rows


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_folder(path: Path) -> bool:
    """A directory of class subfolders holding images (torchvision's ImageFolder layout)."""
    return any(sub.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir()) for sub in path.iterdir())


def _read_image_folder(path: Path) -> list[Row]:
    """One row per image: `image` (its path) and `label` (its subfolder's name). Other files are ignored,
    as ImageFolder ignores them; a class folder with no images is an error (its class would be unlearnable)."""
    rows = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not images:
            raise DataError(f"{sub}: a class folder with no images ({', '.join(IMAGE_SUFFIXES)}); add some or remove it")
        rows += [Row({"image": str(f.absolute()), "label": sub.name}, str(f)) for f in images]
    return rows


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}:1: the file is UTF-16 (or UTF-32), not UTF-8; re-save it as UTF-8")
    raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows tools write a byte-order mark; it is not part of the data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}: {err.reason}; Latin-1 or Windows-1252?); "
                        "re-save the file as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:  # valid UTF-8, but JSON and CSV never hold a raw NUL: UTF-16 without a byte-order mark does
        raise DataError(f"{path}:{text.count(chr(10), 0, nul) + 1}: a NUL byte (UTF-16 without a byte-order mark?); "
                        "re-save the file as UTF-8")
    return text


class _Refused(Exception):
    """JSON that Python's `json` accepts but other readers do not: a repeated key (which one wins?) or NaN/Infinity."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        keys = [k for k, _ in pairs]
        key = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise _Refused(f"the key '{key}' appears twice in one object; keep one")
    return obj


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON; write null or a number")


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _refused_at(text: str) -> int:
    """Where `_Refused` struck: the C scanner keeps no position, so (after a failure only) parse again with the
    pure-Python scanner, noting where each object or array that the refusal passes through began."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    starts: list[int] = []

    def noting(parse):
        def wrapped(s_and_end, *args):
            try:
                return parse(s_and_end, *args)
            except _Refused:
                starts.append(s_and_end[1] - 1)
                raise
        return wrapped

    decoder.parse_object = noting(json.decoder.JSONObject)
    decoder.parse_array = noting(json.decoder.JSONArray)
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        decoder.decode(text)
    except _Refused:
        pass
    return starts[0] if starts else 0  # the innermost container


def _hint(err: json.JSONDecodeError) -> str:
    rest, before = err.doc[err.pos : err.pos + 1], err.doc[: err.pos].rstrip()
    if rest == "'":
        return "JSON strings take double quotes (a Python dict written with str() instead of json.dumps()?)"
    if before.endswith(",") and rest in ("}", "]"):
        return "remove the trailing comma"
    if err.msg == "Extra data":
        return "more than one JSON value: a .jsonl file holds one object per line, a .json file one list of objects"
    return "fix the JSON there"


def _parse(text: str, path: Path, first_line: int = 1) -> Any:
    try:
        return _STRICT.decode(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{first_line + err.lineno - 1}: not valid JSON ({err.msg} at column {err.colno}); "
                        f"{_hint(err)}") from err
    except _Refused as err:
        line = first_line + text.count("\n", 0, _refused_at(text))
        raise DataError(f"{path}:{line}: {err}") from None


def _read_json(path: Path) -> list[Row]:
    """JSON Lines, or one JSON document: a list of objects, or an object with one key holding that list.

    The extension is only a hint: a .json file of JSON Lines and a .jsonl file holding one array both load.
    """
    text = _decode(path)
    start = text.lstrip()[:1]
    if path.suffix.lower() != ".json" and start != "[":
        return _json_lines(text, path)
    try:
        doc = _parse(text, path)
    except DataError as err:
        if start == "{" and isinstance(err.__cause__, json.JSONDecodeError) and err.__cause__.msg == "Extra data":
            return _json_lines(text, path)
        raise
    from unitune.data import coco

    if coco.is_coco(doc):  # detection annotations: one row per image
        return coco.rows(doc, path)
    if isinstance(doc, dict):  # {"data": [...]} or a single split
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) > 1:
            raise DataError(f"{path}: the keys {lists} each hold a list; put the training rows alone in a file")
        if not lists or lists[0] in ("messages", "conversations"):  # one row, not a list of them
            raise DataError(f"{path}: one JSON object with keys {list(doc)}, not a list of rows; wrap it in [ ]")
        doc = doc[lists[0]]
    if not isinstance(doc, list):
        raise DataError(f"{path}:1: a JSON {type(doc).__name__}, not a list of rows; write [{{...}}, {{...}}]")
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise DataError(f"{path}:record {i}: a JSON {type(item).__name__}, not an object; each row is {{\"key\": value, ...}}")
    return [Row(item, f"{path}:record {i}") for i, item in enumerate(doc)]


def _json_lines(text: str, path: Path) -> list[Row]:
    rows = []
    # Only "\n" ends a line: str.splitlines() would also split inside strings at U+2028 and friends.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        obj = _parse(line, path, n)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: a JSON {type(obj).__name__}, not an object; each line of a .jsonl file "
                            "holds one {\"key\": value, ...} row")
        rows.append(Row(obj, f"{path}:{n}"))
    return rows


def _read_csv(path: Path) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB a field) refuses long documents
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter, strict=True)
    rows, header, columns = [], None, None
    while True:
        first = reader.line_num + 1  # a quoted field may span lines: name the line the row starts on
        try:
            fields = next(reader, None)
        except csv.Error as err:
            raise DataError(f"{path}:{first}: not valid CSV ({err}); quote fields that hold '{delimiter}', "
                            "quotes (doubled) or line breaks") from None
        if fields is None:
            return rows
        if not fields:  # a blank line
            continue
        if header is None:
            header, columns = fields, f"{path}: header has columns {fields}"
            if len(set(header)) < len(header):
                raise DataError(f"{columns}; name each column once")
            continue
        if len(fields) != len(header):
            more = "more" if len(fields) > len(header) else "fewer"
            raise DataError(f"{path}:{first}: {more} fields than the header names ({len(fields)} for {len(header)}); "
                            f"quote fields that hold '{delimiter}' or line breaks")
        rows.append(Row(dict(zip(header, fields)), f"{path}:{first}", columns))


def _records(records: list[dict], names: list[str], path: Path) -> list[Row]:
    columns = f"{path}: has columns {names}"
    return [Row(r, f"{path}:row {i}", columns) for i, r in enumerate(records)]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as err:
        raise DataError(f"{path}: not a readable Parquet file ({err}); write it again with pandas or pyarrow") from None
    return _records(table.to_pylist(), table.column_names, path)


def _read_datasets_dir(path: Path) -> list[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet"))
        hint = f"name one of its files ({', '.join(files)})" if files else "name a data file or such a directory"
        raise DataError(f"{path}: a directory, but not a `datasets` save_to_disk one; {hint}") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {list(ds)}); save the split as 'train'")
        ds = ds["train"]
    return _records(ds.to_list(), ds.column_names, path)


def write_rows(path: str | Path, rows: list[Row]) -> None:
    """The rows' data, written atomically in the format `path`'s suffix names: a .json file holds one list of
    objects; a Parquet file keeps the schema of the Parquet file the rows were read from."""
    path = Path(path).expanduser()
    writers = {".jsonl": _write_json_lines, ".ndjson": _write_json_lines, ".json": _write_json, ".csv": _write_csv,
               ".tsv": _write_csv, ".parquet": _write_parquet}
    suffix = path.suffix.lower()
    if suffix not in writers:
        raise DataError(f"{path}: cannot write '{suffix}' files; use one of {', '.join(writers)}")
    writers[suffix](path, rows)


def _write_json_lines(path: Path, rows: list[Row]) -> None:
    atomic.write_text(path, "".join(json.dumps(r.data, ensure_ascii=False) + "\n" for r in rows))


def _write_json(path: Path, rows: list[Row]) -> None:
    atomic.write_text(path, json.dumps([r.data for r in rows], ensure_ascii=False, indent=1) + "\n")


def _write_csv(path: Path, rows: list[Row]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, list(rows[0].data), delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.data for r in rows)
    atomic.write_text(path, text.getvalue())


def _write_parquet(path: Path, rows: list[Row]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = rows[0].file
    schema = pq.read_schema(source) if source and source.suffix.lower() == ".parquet" else None
    with atomic.temp_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist([r.data for r in rows], schema=schema), tmp)
