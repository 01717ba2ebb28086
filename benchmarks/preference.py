"""The preference objectives on one task and one budget: one table.

Trains SmolLM2-135M-Instruct with LoRA from recipes/dpo.yaml under each objective (30 steps of 4
pairs; KTO: 4 unpaired rows of the same orders, half answered right), each in its own process, and
writes held-out exact match (greedy answers to 48 orders never seen in training), the reward
margin and pairwise accuracy on 64 held-out pairs, the chosen answers' log-probability before and
after, training tokens/s (median over steps) and peak RSS to stdout and
benchmarks/results/preference.md.

    python benchmarks/preference.py [--only dpo orpo ...] [--steps 30]
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
RECIPE = ROOT / "recipes" / "dpo.yaml"
FEEDBACK = ["data.train=data/generated/order-feedback/train.jsonl",
            "data.validation=data/generated/order-feedback/val.jsonl",
            "data.generator=unitune.tasks.orders:write_feedback"]
VARIANTS = {
    "dpo": ["objective.name=dpo", "objective.rpo_alpha=null"],
    "dpo + rpo_alpha=1": ["objective.name=dpo", "objective.rpo_alpha=1.0"],
    "ipo": ["objective.name=dpo", "objective.loss_type=ipo", "objective.rpo_alpha=null"],
    "simpo": ["objective.name=simpo"],
    "orpo": ["objective.name=orpo"],
    "kto": ["objective.name=kto", *FEEDBACK],
}
REWARD = ROOT / "recipes" / "reward.yaml"  # the reward model: the same pairs, ranked by a scalar head


def worker(name: str, steps: int) -> None:
    """Runs in a child process: one training run, then one JSON line of results."""
    import unitune

    t0 = time.time()
    recipe, overrides = (REWARD, []) if name == "reward" else (RECIPE, VARIANTS[name])
    run = unitune.train(str(recipe), [*overrides, f"train.steps={steps}", f"train.eval_every={steps}",
                                      f"output.name=preference-{name.split()[0]}", "output.overwrite=true"])
    speeds = [r["tokens_per_s"] for r in run.history if r["split"] == "train" and r["step"] > 1]
    # the table's columns; a reward model logs its own margin and accuracy, of its scalar rewards
    keys = {"exact_match": "exact_match", "val_loss": "val_loss", "val_rewards/margins": "val_rewards/margins",
            "val_rewards/accuracies": "val_rewards/accuracies", "val_logps/chosen": "val_logps/chosen"}
    if name == "reward":
        keys.update({"val_rewards/margins": "val_margin", "val_rewards/accuracies": "val_accuracy"})
    print("RESULT " + json.dumps({
        "before": {k: run.before.get(v) for k, v in keys.items()}, "after": {k: run.metrics.get(v) for k, v in keys.items()},
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": time.time() - t0,
    }), flush=True)


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, dict], steps: int) -> str:
    rows = ["| objective | exact match (before -> after) | margin | pair accuracy | chosen log-prob (before -> after) "
            "| tokens/s | peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
            continue
        b, a = r["before"], r["after"]
        rows.append(f"| {name} | {_f(b['exact_match'])} -> {_f(a['exact_match'])} | {_f(b['val_rewards/margins'], '.2f')} "
                    f"-> {_f(a['val_rewards/margins'], '.2f')} | {_f(b['val_rewards/accuracies'], '.2f')} -> "
                    f"{_f(a['val_rewards/accuracies'], '.2f')} | {_f(b['val_logps/chosen'], '.1f')} -> "
                    f"{_f(a['val_logps/chosen'], '.1f')} | {_f(r['tokens_per_s'], '.0f')} | {r['peak_rss_mib']:,.0f} MiB |")
    note = (f"\nSmolLM2-135M-Instruct + LoRA r16 all-linear, {steps} steps of 4 pairs (KTO: 4 rows), lr 5e-4, "
            "2 CPU cores. Margin and accuracy on 64 held-out pairs (KTO: its own reward scale, on unpaired rows); "
            "chosen log-prob: summed over an answer's tokens, mean over the held-out pairs. reward: recipes/reward.yaml, "
            "a scalar head on the same model and pairs (8 pairs a step), its margin and accuracy of its own rewards. tokens/s: the tokens "
            "of the policy's batches per second of training, the reference pass (DPO, IPO, KTO) inside that time.\n")
    return "\n".join(rows) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    saved = json.loads((out / "preference.json").read_text()) if args.only and (out / "preference.json").is_file() else {}
    for name in [n for n in [*VARIANTS, "reward"] if not args.only or n.split()[0] in args.only or n in args.only]:
        saved[name] = spawn(__file__, ["--worker", name, "--steps", str(args.steps)])
        print(f"{name}: {saved[name]}", flush=True)
        (out / "preference.json").write_text(json.dumps(saved, indent=1))
    text = table({n: saved[n] for n in [*VARIANTS, "reward"] if n in saved}, args.steps)
    print(text)
    (out / "preference.md").write_text(text)


if __name__ == "__main__":
    main()
