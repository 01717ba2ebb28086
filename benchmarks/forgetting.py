"""Forgetting against gain: the quickstart task learned with full fine-tuning and LoRA, each alone and with
each mitigation (replay, L2-SP, KL to the base), on one budget: one table.

Every run trains SmolLM2-135M-Instruct for 30 steps on the orders task (recipes/compare/full.yaml and
lora.yaml, their learning rates), in its own process, and is scored on the task (exact match on 48 held-out
orders) and on the `general` retention set (40 one-word general-knowledge questions, contains match, and the
loss of their answers), beside the base model's scores. The claim under test: LoRA forgets less than full
fine-tuning at equal gain, and each mitigation moves the trade-off.

    python benchmarks/forgetting.py [--only lora lora+replay ...] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spawn import spawn

ROOT = Path(__file__).resolve().parents[1]
RETAIN = "retain_general_contains_match"
# Each mitigation's strength, one value per method, chosen before the runs: the penalty's gradient
# alpha * (theta - theta_0) about the size of the task's per-weight gradient after ~10 steps.
MITIGATIONS = {
    "": [],
    "+replay": ["data.replay=0.25"],  # a quarter of the examples: the base model's own answers to `chat`
    "+kl": ["objective.kl_to_base=1.0"],
    "+l2sp": {"lora": ["train.l2_sp=0.1"], "full": ["train.l2_sp=1.0"]},
}
VARIANTS = {f"{method}{name}": (method, opts[method] if isinstance(opts, dict) else opts)
            for method in ("full", "lora") for name, opts in MITIGATIONS.items()}
COMMON = ["eval.retention=[general]", "eval.before=false", "output.dir=runs/forgetting", "output.overwrite=true"]


def worker(name: str, steps: int) -> None:
    """In a child process: one training run, then one JSON line of results."""
    import unitune

    method, options = VARIANTS[name]
    t0 = time.time()
    run = unitune.train(str(ROOT / "recipes" / "compare" / f"{method}.yaml"),
                        [*COMMON, *options, f"train.steps={steps}", f"train.eval_every={steps}", f"output.name={name}"])
    keys = ("exact_match", "val_loss", RETAIN, "retain_general_loss")
    print("RESULT " + json.dumps({**{k: run.metrics[k] for k in keys}, "wall_s": time.time() - t0}), flush=True)


def base_scores() -> None:
    import unitune

    b = unitune.evaluate(str(ROOT / "recipes" / "compare" / "lora.yaml"), COMMON)["base"]
    print("RESULT " + json.dumps({k: b[k] for k in ("exact_match", "val_loss", RETAIN, "retain_general_loss")}))


def table(base: dict, results: dict[str, dict], steps: int) -> str:
    lines = ["| run | task exact match (gain) | general knowledge (drop) | general answer loss | options |",
             "|---|---:|---:|---:|---|",
             f"| base model | {base['exact_match']:.3f} | {base[RETAIN]:.3f} | {base['retain_general_loss']:.3f} | |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | |")
            continue
        gain, drop = r["exact_match"] - base["exact_match"], r[RETAIN] - base[RETAIN]
        lines.append(f"| {name} | {r['exact_match']:.3f} ({gain:+.3f}) | {r[RETAIN]:.3f} ({drop:+.3f}) "
                     f"| {r['retain_general_loss']:.3f} | {' '.join(f'`{o}`' for o in VARIANTS[name][1])} |")
    note = (f"\nSmolLM2-135M-Instruct, {steps} steps of the quickstart task each (batch 2 packed rows of 512), "
            "full fine-tuning at lr 5e-5 and LoRA r=16 at lr 1e-3 (recipes/compare/). General knowledge: contains match "
            "of greedy answers to the 40 questions of `eval.retention: [general]`, which no run trains on (replay "
            "rehearses other prompts, unitune/tasks/chat.py).\n")
    return "\n".join(lines) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--base", action="store_true")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    if args.base:
        return base_scores()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    saved = json.loads((out / "forgetting.json").read_text()) if args.only and (out / "forgetting.json").is_file() else {}
    base = saved.get("base") or spawn(__file__, ["--base"])
    print(f"base: {base}", flush=True)
    results = saved.get("results", {})
    for name in args.only or VARIANTS:
        results[name] = spawn(__file__, ["--worker", name, "--steps", str(args.steps)])
        print(f"{name}: {results[name]}", flush=True)
        (out / "forgetting.json").write_text(json.dumps({"base": base, "results": results}, indent=1))
    text = table(base, {n: results[n] for n in VARIANTS if n in results}, args.steps)
    print(text)
    (out / "forgetting.md").write_text(text)


if __name__ == "__main__":
    main()
