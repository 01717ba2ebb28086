"""Every method on the quickstart task with the same step budget: one table.

Trains SmolLM2-135M-Instruct with each recipe in recipes/compare/ (30 steps each), each in its own
process, and writes task score (exact match on 48 held-out orders, greedy), validation loss,
trainable parameters, training tokens/s (median over steps) and peak resident memory, beside
the base model's score, to stdout and benchmarks/results/methods.md.

    python benchmarks/methods.py [--only lora prompt ...] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from spawn import spawn

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["full", "lora", "qlora", "adapter", "ia3", "layernorm", "partial", "prefix", "prompt", "ptuning"]


def worker(recipe: str, steps: int) -> None:
    """Runs in a child process: one training run, then one JSON line of results."""
    import unitune

    t0 = time.time()
    run = unitune.train(recipe, [f"train.steps={steps}", f"train.eval_every={steps}", "output.overwrite=true"])
    speeds = [r["tokens_per_s"] for r in run.history if r["split"] == "train" and r["step"] > 1]
    print("RESULT " + json.dumps({
        "exact_match": run.metrics.get("exact_match"), "val_loss": run.metrics["val_loss"],
        "trainable": run.params["trainable"], "total": run.params["total"],
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": time.time() - t0,
    }), flush=True)


def base_score() -> dict:
    import unitune

    return unitune.evaluate(str(ROOT / "recipes" / "compare" / "lora.yaml"))["base"]


def table(base: dict, results: dict[str, dict], steps: int) -> str:
    head = ["| method | exact match | val loss | trainable params | tokens/s | peak RSS |",
            "|---|---:|---:|---:|---:|---:|",
            f"| base model (no training) | {base['exact_match']:.3f} | {base['val_loss']:.3f} | 0 | | |"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:80]} | | | | |")
            continue
        share = 100 * r["trainable"] / r["total"]
        rows.append(f"| {name} | {r['exact_match']:.3f} | {r['val_loss']:.3f} | {r['trainable']:,} ({share:.2f}%) "
                    f"| {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:,.0f} MiB |")
    note = (f"\nSmolLM2-135M-Instruct, {steps} steps each, 2 CPU cores, fp32. Exact match: greedy answers to 48 held-out "
            "orders. tokens/s counts every token a step processes; virtual-token methods train on 8 unpacked "
            "examples per step, the others on 2 packed rows of 512.\n")
    return "\n".join(head + rows) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--base", action="store_true")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    if args.base:
        b = base_score()
        print("RESULT " + json.dumps({"exact_match": b.get("exact_match"), "val_loss": b["val_loss"]}))
        return
    names = [n for n in ORDER if (ROOT / "recipes" / "compare" / f"{n}.yaml").is_file()]
    names = [n for n in args.only if n in names] if args.only else names  # --only: in the order given
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    saved = json.loads((out / "methods.json").read_text()) if args.only and (out / "methods.json").is_file() else {}
    base = saved.get("base") or spawn(__file__, ["--base"])
    print(f"base: {base}", flush=True)
    results = saved.get("results", {})
    for name in names:
        recipe = str(ROOT / "recipes" / "compare" / f"{name}.yaml")
        results[name] = spawn(__file__, ["--worker", recipe, "--steps", str(args.steps)])
        print(f"{name}: {results[name]}", flush=True)
        (out / "methods.json").write_text(json.dumps({"base": base, "results": results}, indent=1))
    results = {n: results[n] for n in ORDER if n in results}
    text = table(base, results, args.steps)
    print(text)
    (out / "methods.md").write_text(text)


if __name__ == "__main__":
    main()
