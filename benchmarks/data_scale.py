"""Data at scale: rows/s and peak memory of turning a chat file into training examples, before and after the
tokenized-data cache (data/cache.py) and worker processes, with SmolLM2's tokenizer.

For each size (10k and 100k rows by default; --rows 1000000 adds a million), each in its own process:
- serial, no cache: one process tokenizes every row (what every run did before the cache);
- first run: worker processes tokenize, the cache is written;
- later run: the same recipe again, read from the cache.

    python benchmarks/data_scale.py [--rows 10000 100000 1000000] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from spawn import ROOT, report, span, spawn

MODES = {"serial, no cache": ["--num-proc", "1", "--no-cache"], "first run (workers, cache written)": [],
         "later run (cache read)": []}


def write_rows(path: Path, n: int) -> None:
    """Short chat rows like the quickstart's: an instruction of ~20 words and a one-line answer."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Order {i}: please send {i % 7 + 1} boxes of item {i * 37 % 1000} "
                                               f"to warehouse {i % 13} before Friday, packed with care.",
                                "output": json.dumps({"order": i, "qty": i % 7 + 1, "item": i * 37 % 1000})}) + "\n")


def worker(path: str, num_proc: int | None, cache: bool) -> None:
    from unitune.config import DataConfig, ModelConfig
    from unitune.data import build
    from unitune.models.loader import load_tokenizer, model_path
    from unitune.objectives import sft

    cfg = ModelConfig()
    tok = load_tokenizer(model_path(cfg), cfg)
    data = DataConfig(max_length=512, num_proc=num_proc)
    t0 = time.perf_counter()
    stats: dict = {}
    examples = build.load_examples(path, data, tok, sft.example, stats, cache=cache)
    seconds = time.perf_counter() - t0
    import resource

    report({"rows": stats["rows"], "seconds": seconds, "rows_per_s": stats["rows"] / seconds, "examples": len(examples),
            "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})  # the largest worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--num-proc", type=int)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.num_proc, not args.no_cache)
    lines = ["| rows | mode | rows/s | seconds | peak RSS (main process) | peak RSS (largest worker) |",
             "|---:|---|---:|---:|---:|---:|"]
    results: dict = {}
    for n in args.rows:
        with tempfile.TemporaryDirectory(prefix="unitune-data-scale-") as tmp:
            path = Path(tmp) / "rows.jsonl"
            write_rows(path, n)
            for rnd in range(args.repeat):
                os.environ["UNITUNE_CACHE"] = str(Path(tmp) / f"cache-{rnd}")  # each round starts with no cache
                for mode, extra in MODES.items():
                    out = spawn(__file__, ["--worker", str(path), *extra])
                    if "error" in out:
                        raise SystemExit(f"{n} rows, {mode}: {out['error']}")
                    results.setdefault(f"{n}|{mode}", []).append(out)
                    print(f"{n} rows, round {rnd + 1}, {mode}: {out}", flush=True)
        for mode in MODES:
            runs = results[f"{n}|{mode}"]
            lines.append(f"| {n:,} | {mode} | {span([r['rows_per_s'] for r in runs])} | "
                         f"{span([r['seconds'] for r in runs], '.1f')} | "
                         f"{span([r['peak_rss_mib'] for r in runs])} MiB | "
                         f"{span([r['worker_rss_mib'] for r in runs])} MiB |")
    text = "\n".join(lines) + f"\n\n{os.cpu_count()} CPU cores; SmolLM2's tokenizer, max_length 512; each cell the " \
                              f"range over {args.repeat} rounds, each run in its own process.\n"
    print(text)
    out = ROOT / "benchmarks" / "results"
    (out / "data_scale.md").write_text(text)
    (out / "data_scale.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
