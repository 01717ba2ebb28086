"""Privacy, shown and timed.

1. recipes/privacy.yaml (LoRA on the orders task, canaries planted 1, 4 and 16 times) trained without DP and
   with DP-SGD at epsilon 8, delta 1e-5, each in its own process, then audited (`unitune audit`): task score
   (exact match), canary exposure per repetition count and membership AUC, beside the base model's.
2. One DP-SGD step on the same 32 examples, unitune (a backward per example) against Opacus + PEFT (per-sample
   gradients from Opacus's hooks on PEFT's LoRA modules, DPOptimizer), alternating in separate processes:
   examples/s and peak RSS.

    python benchmarks/privacy.py [--candidates 500] [--rounds 3] [--only show|speed]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from spawn import alternate, spawn, span

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "privacy.yaml")
RUNS = {"no DP": ["privacy.target_epsilon=null", "output.name=privacy-off"], "DP-SGD, epsilon 8": []}


def train_worker(name: str, candidates: int) -> None:
    import unitune
    from unitune.privacy.audit import audit

    t0 = time.time()
    run = unitune.train(RECIPE, [*RUNS[name], "output.overwrite=true"])
    train_s = time.time() - t0
    found = audit(run.dir, candidates=candidates)
    log = [r for r in run.history if r["split"] == "train"]
    print("RESULT " + json.dumps({
        "before": run.before.get("exact_match"), "after": run.metrics.get("exact_match"),
        "val_loss": run.metrics.get("val_loss"), "epsilon": log[-1].get("epsilon"), "steps": len(log),
        "train_s": train_s, "canaries": found["canaries"]["by_repeats"], "auc": found["membership"]["auc"]}),
        flush=True)


def show(candidates: int) -> str:
    results = {}
    for name in RUNS:
        results[name] = spawn(__file__, ["--worker", "train", name, "--candidates", str(candidates)])
        print(name, results[name], flush=True)
        if "error" in results[name]:
            raise SystemExit(f"{name} failed: {results[name]['error']}")
    first = next(iter(results.values()))
    repeats = sorted(first["canaries"], key=int)
    head = ["| model | exact match | epsilon | " + " | ".join(f"exposure, {r}x (bits)" for r in repeats) +
            " | membership AUC | membership AUC, calibrated |",
            "|---|---:|---:|" + "---:|" * len(repeats) + "---:|---:|"]
    rows = [f"| base model | {first['before']:.3f} | | " +
            " | ".join(f"{first['canaries'][r]['base']:.1f}" for r in repeats) + f" | {first['auc']['base']:.3f} | |"]
    for name, r in results.items():
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "inf"
        rows.append(f"| {name} | {r['after']:.3f} | {eps} | " +
                    " | ".join(f"{r['canaries'][k]['tuned']:.1f}" for k in repeats) +
                    f" | {r['auc']['tuned']:.3f} | {r['auc']['tuned_calibrated']:.3f} |")
    size = "log2(10^6) = 19.9"
    note = (f"\nrecipes/privacy.yaml: SmolLM2-135M-Instruct, LoRA r8 on q/v, 400 orders + 2 canaries x (1, 4, 16) "
            f"repetitions, {first['steps']} steps of 32 examples (Poisson-sampled under DP), 2 CPU cores. Exposure: "
            f"mean over the canaries of each repetition count, rank among {candidates} random secrets, at most "
            f"{size} bits. Membership AUC: loss of the 400 training orders against 200 held-out ones (0.5 = chance); "
            f"calibrated: the tuned model's loss minus the base model's. Training time: "
            + ", ".join(f"{n} {r['train_s']:.0f} s" for n, r in results.items()) + ".\n")
    return "\n".join(head + rows) + "\n" + note


def speed_worker(system: str, n: int, steps: int) -> None:
    import torch

    from unitune import api
    from unitune.config import PrivacyConfig, load_recipe
    from unitune.objectives import sft
    from unitune.privacy import dp

    torch.manual_seed(0)
    recipe = load_recipe(RECIPE)
    loaded, data = api.prepare(recipe, torch.device("cpu"))
    examples, pad = data.train[:n], loaded.tokenizer.pad_token_id
    if system == "unitune":
        model = loaded.model
        params = [p for p in model.parameters() if p.requires_grad]
        private = dp.DPSGD(PrivacyConfig(noise_multiplier=1.0), dp.PoissonBatches(examples, n, pad, 512, 0,
                                                                                   sft.collate), steps)
        opt = torch.optim.AdamW(params, lr=1e-3)
        batch = {"examples": [sft.collate(examples, [[i]], pad, False, 512) for i in range(n)]}
        cfg = sft.Config()

        def step():
            private.step(params, batch, lambda ex: sft.loss(model, ex, cfg, None), sft.count, print)
            opt.step()
            opt.zero_grad()
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from peft import LoraConfig, get_peft_model

        base = api.load_with_data(load_recipe(RECIPE, ["method.name=full"]), torch.device("cpu"))[0].model
        m = recipe.method
        peft = get_peft_model(base, LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=0.0,
                                               target_modules=list(m.target_modules)))
        gsm = GradSampleModule(peft, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.AdamW([p for p in gsm.parameters() if p.requires_grad], lr=1e-3),
                          noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=n)
        padded = sft.collate(examples, [[i] for i in range(n)], pad, False, 512)

        def step():
            logits = gsm(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            logp = torch.log_softmax(logits.float(), -1)
            keep = padded["targets"] != -100
            nll = -logp.gather(-1, padded["targets"].clamp(min=0)[..., None])[..., 0] * keep
            (nll.sum(1) / keep.sum(1)).mean().backward()
            opt.step()
            opt.zero_grad()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rate = n * steps / (time.perf_counter() - t0)
    print("RESULT " + json.dumps({"examples_per_s": rate,
                                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
          flush=True)


def speed(rounds: int, n: int, steps: int) -> str:
    results = alternate(__file__, ["unitune", "opacus"], rounds, ["--examples", str(n), "--steps", str(steps)])
    ours, peer = results["unitune"], results["opacus"]
    ratio = [a["examples_per_s"] / b["examples_per_s"] for a, b in zip(ours, peer)]
    mem = [a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(ours, peer)]
    return ("| system | examples/s | peak RSS |\n|---|---:|---:|\n"
            f"| unitune (a backward per example) | {span([r['examples_per_s'] for r in ours], '.1f')} | "
            f"{span([r['peak_rss_mib'] for r in ours])} MiB |\n"
            f"| Opacus 1.6 hooks + PEFT | {span([r['examples_per_s'] for r in peer], '.1f')} | "
            f"{span([r['peak_rss_mib'] for r in peer])} MiB |\n"
            f"| ratio | {span(ratio, '.2f')}x | {span(mem, '.2f')}x |\n\n"
            f"One DP-SGD step of {n} orders (clip, noise 1.0, AdamW), {steps} timed steps after one warm-up, "
            f"{rounds} rounds alternating in separate processes, 2 CPU cores, fp32.\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", choices=["show", "speed"])
    args = ap.parse_args()
    if args.worker:
        if args.worker[0] == "train":
            train_worker(" ".join(args.worker[1:]), args.candidates)
        else:
            speed_worker(args.worker[0], args.examples, args.steps)
        return
    out = ROOT / "benchmarks" / "results" / "privacy.md"
    parts = []
    if args.only != "speed":
        parts.append(show(args.candidates))
    if args.only != "show":
        parts.append(speed(args.rounds, args.examples, args.steps))
    text = "\n".join(parts)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
