"""Canaries: random secrets in a fixed template, inserted into a training file a known number of times
(`unitune canaries`), so that `unitune audit` can measure how much of each the tuned model gives away.

Carlini et al., "The Secret Sharer" (USENIX Security 2019): a canary is a template with a random secret,
"the pin of the amber heron account is 493817", the secret drawn uniformly from a space R (here every
string of `digits` decimal digits, |R| = 10^digits). A model that never saw it ranks the secret among
all of R like any other; one that memorised it ranks it first. Each canary gets a key of its own (a
colour and an animal) so canaries repeated a different number of times do not share a prefix: the model
cannot lift one secret by learning another.

A canary row is written in the data file's own format (`formats.detect`, as the data layer reads it), so
it trains like every other row: in the chat and instruction formats a question naming the key, answered
by the canary sentence (the assistant's turn, where the loss is); in the text format the sentence alone.
The rows are shuffled in among the file's rows with the seed; OUT + ".canaries.json" records each
canary's secret, repetitions, key, sentence and row, with the template and the secret space.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unitune import atomic
from unitune.data.files import DataError, Row, read_rows, write_rows
from unitune.data.formats import detect

TEMPLATE = "the pin of the {key} account is {secret}"
QUESTION = "What is the pin of the {key} account?"
COLOURS = ("amber", "azure", "coral", "crimson", "ivory", "jade", "lilac", "ochre", "olive", "scarlet", "teal",
           "umber")
ANIMALS = ("badger", "bison", "crane", "gecko", "heron", "ibis", "lynx", "marten", "newt", "otter", "puffin",
           "walrus")


@dataclass
class Canary:
    key: str
    secret: str
    repeats: int
    text: str  # the sentence with its secret, as it stands in `row`
    row: dict[str, Any]  # the row inserted `repeats` times

    @property
    def prefix(self) -> str:
        return TEMPLATE.format(key=self.key, secret="")

    def row_with(self, secret: str) -> dict[str, Any]:
        """The canary's row with another secret in its place: a candidate the audit ranks the secret among."""
        return _replace(self.row, self.text, TEMPLATE.format(key=self.key, secret=secret))


@dataclass
class Canaries:
    file: Path  # the .canaries.json file these came from
    data: str  # the file the canaries went into, and the file written with them
    out: str
    format: str
    digits: int  # the secret space: every string of this many decimal digits
    canaries: list[Canary]

    @property
    def size(self) -> int:
        return 10 ** self.digits


def _replace(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return value


def contains(value: Any, text: str) -> bool:
    """Whether any string in a row (nested: messages, parts) holds `text`."""
    if isinstance(value, str):
        return text in value
    if isinstance(value, list):
        return any(contains(v, text) for v in value)
    if isinstance(value, dict):
        return any(contains(v, text) for v in value.values())
    return False


def _row(template: Row, fmt: str, question: str, sentence: str) -> dict[str, Any]:
    """A row in the format of `template` (same columns, the others empty, as a CSV or Parquet file needs)."""
    row: dict[str, Any] = dict.fromkeys(template.data)
    if fmt == "text":
        return row | {"text": sentence}
    if fmt == "instruction":
        return row | {"instruction": question, "output": sentence}
    if "conversations" in template.data and "messages" not in template.data:  # ShareGPT's field names
        return row | {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": sentence}]}
    return row | {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": sentence}]}


def insert(data: str | Path, out: str | Path, repeats: list[int] = (1, 4, 16), per_repeat: int = 2, digits: int = 6,
           seed: int = 0) -> Canaries:
    """Write `out`: the rows of `data` with `per_repeat` canaries for each repetition count, each canary's row
    `repeats` times, at positions drawn with `seed`; and `out`.canaries.json describing them."""
    if not repeats or min(repeats) < 1 or per_repeat < 1:
        raise ValueError(f"canaries: repetitions {list(repeats)} and --per-repeat {per_repeat} must be at least 1")
    if not 1 <= digits <= 18:
        raise ValueError(f"canaries: --digits {digits}; a secret has 1 to 18 digits (|R| = 10^digits)")
    keys = [f"{c} {a}" for c in COLOURS for a in ANIMALS]
    n = len(repeats) * per_repeat
    if n > len(keys):
        raise ValueError(f"canaries: {n} canaries asked for, {len(keys)} keys to give them; ask for fewer")
    data, out = Path(data).expanduser(), Path(out).expanduser()
    if out.resolve() == data.resolve():
        raise ValueError(f"canaries: -o {out} is the data file itself; write the canaried rows to a new file")
    rows = read_rows(data)
    fmt = detect(rows[0])
    rng = random.Random(seed)
    canaries, secrets = [], set()
    for key, count in zip(rng.sample(keys, n), [r for r in repeats for _ in range(per_repeat)]):
        while (secret := "".join(rng.choices("0123456789", k=digits))) in secrets:
            pass
        secrets.add(secret)
        text = TEMPLATE.format(key=key, secret=secret)
        canaries.append(Canary(key, secret, count, text, _row(rows[0], fmt, QUESTION.format(key=key), text)))
    copies = [Row(c.row, f"canary '{c.key}'", file=rows[0].file) for c in canaries for _ in range(c.repeats)]
    rng.shuffle(copies)
    at = set(rng.sample(range(len(rows) + len(copies)), len(copies)))
    source, inserted = iter(rows), iter(copies)
    write_rows(out, [next(inserted) if i in at else next(source) for i in range(len(rows) + len(copies))])
    result = Canaries(Path(f"{out}.canaries.json"), str(data), str(out), fmt, digits, canaries)
    atomic.write_text(result.file, json.dumps(
        {"data": result.data, "out": result.out, "format": fmt, "seed": seed, "template": TEMPLATE,
         "question": QUESTION if fmt != "text" else None,
         "secret_space": {"alphabet": "0123456789", "digits": digits, "size": result.size},
         "canaries": [asdict(c) | {"prefix": c.prefix} for c in canaries]}, indent=1, ensure_ascii=False) + "\n")
    return result


def load(path: str | Path) -> Canaries:
    """A .canaries.json file as `insert` wrote it; an error names the file and what is wrong with it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"canaries file not found: {path} (write one with `unitune canaries DATA -o OUT`)")
    try:
        raw = json.loads(path.read_text())
        canaries = [Canary(c["key"], c["secret"], int(c["repeats"]), c["text"], c["row"]) for c in raw["canaries"]]
        result = Canaries(path, raw["data"], raw["out"], raw["format"], int(raw["secret_space"]["digits"]), canaries)
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a canaries file as `unitune canaries` writes it ({type(err).__name__}: {err})") \
            from None
    for c in canaries:
        if c.text != TEMPLATE.format(key=c.key, secret=c.secret) or len(c.secret) != result.digits \
                or not c.secret.isdigit() or not contains(c.row, c.text):
            raise DataError(f"{path}: canary '{c.key}' does not fit the template {TEMPLATE!r} with a "
                            f"{result.digits}-digit secret; was the file edited?")
    return result


def describe(result: Canaries) -> str:
    counts: dict[int, int] = {}
    for c in result.canaries:
        counts[c.repeats] = counts.get(c.repeats, 0) + 1
    per = ", ".join(f"{n} x {r} {'repetition' if r == 1 else 'repetitions'}" for r, n in sorted(counts.items()))
    rows = sum(c.repeats for c in result.canaries)
    return (f"wrote {result.out}: the rows of {result.data} and {rows} canary rows ({per}; {result.format} format, "
            f"secrets of {result.digits} digits, |R| = 10^{result.digits}), described in {result.file}")
