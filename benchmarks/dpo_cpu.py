"""LoRA DPO on SmolLM2-135M-Instruct: unitune vs transformers + PEFT + TRL's DPOTrainer, side by side.

Same weights (the cached safetensors copy of the GGUF), same pairs (the order task's, as message
lists so both apply the chat template and tokenise them identically), same max length, batch of
pairs, steps, learning rate, beta, LoRA rank and targets, fp32 on a CPU without native bf16 in both,
the reference = the policy with its adapter switched off in both. Each with and without reference
log-probabilities precomputed before training (TRL: precompute_ref_log_probs). TRL's padding_free is
unavailable for DPO in TRL 1.16 (it warns and pads), so TRL pads; unitune pads pairs too. The data
holds exactly the pairs the steps use, so both precompute the same pairs.

Each system runs in its own process, alternating order every round; tokens/s = the real (non-pad)
tokens of the policy's batches per second of the training loop (precomputation outside it, shown
apart as total wall time); peak RSS of the process. We report ranges and ratios.

    python benchmarks/dpo_cpu.py [--rounds 2] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from sft_lora_cpu import model_dir
from spawn import alternate, ratios, report, span, trl_timer

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, LR, BETA, R, ALPHA = 512, 8, 5e-4, 0.1, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEMS = {"unitune": "unitune", "unitune-pre": "unitune, objective.precompute_ref=true",
           "trl": "transformers + PEFT + TRL DPOTrainer", "trl-pre": "TRL DPOTrainer, precompute_ref_log_probs=True"}


def pairs_file(bench: Path, n: int) -> Path:
    from unitune.tasks import orders

    orders.write_preferences(bench / "pairs", n_train=n, n_val=0)
    rows = [json.loads(line) for line in (bench / "pairs" / "train.jsonl").read_text().splitlines()]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    path = bench / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conv))
    return path


def run_unitune(data: Path, steps: int, pre: bool) -> dict:
    import unitune

    recipe = {
        "model": {"name": model_dir()},
        "data": {"train": str(data), "max_length": SEQ},
        "method": {"name": "lora", "r": R, "alpha": ALPHA, "target_modules": TARGETS},
        "objective": {"name": "dpo", "beta": BETA, "precompute_ref": pre},
        "train": {"steps": steps, "batch_size": BATCH, "lr": LR, "warmup_steps": 0, "schedule": "constant",
                  "precision": "fp32"},  # as the peer runs (bf16=False), whatever this CPU supports
        "eval": {"before": False, "generate": 0, "batch_size": BATCH},
        "output": {"dir": str(data.parent), "name": "unitune", "overwrite": True},
    }
    run = unitune.train(recipe)
    train = [r for r in run.history if r["split"] == "train"]  # tokens_per_s: loop start to this step
    return {"tokens_per_s": train[-1]["tokens_per_s"], "final_loss": train[-1]["loss"]}


def run_trl(data: Path, steps: int, pre: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("json", data_files=str(data), split="train")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    timer = trl_timer()
    args = DPOConfig(
        output_dir=str(data.parent / "trl"), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, beta=BETA, loss_type=["sigmoid"], max_length=SEQ,
        precompute_ref_log_probs=pre, precompute_ref_batch_size=BATCH, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer],
                         peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    # num_tokens: TRL's own count of the attention mask's ones over both sides, as unitune's real tokens
    return {"tokens_per_s": logs[-1]["num_tokens"] / (timer.end - timer.start), "final_loss": logs[-1]["loss"]}


def worker(system: str, steps: int) -> None:
    t0 = time.perf_counter()
    data = Path(os.environ["BENCH_DIR"]) / "pairs.jsonl"
    run = run_trl if system.startswith("trl") else run_unitune
    result = run(data, steps, pre=system.endswith("-pre"))
    result["wall_s"] = time.perf_counter() - t0
    report(result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.steps)
    bench = ROOT / "runs" / "bench-dpo"
    bench.mkdir(parents=True, exist_ok=True)
    os.environ.update(BENCH_DIR=str(bench), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    pairs_file(bench, a.steps * BATCH)
    model_dir()  # convert the GGUF once, outside the timings
    results = alternate(__file__, list(SYSTEMS), a.rounds, ["--steps", str(a.steps)])

    lines = [f"LoRA DPO (sigmoid, beta {BETA}), SmolLM2-135M-Instruct, r={R} all linear layers, max length {SEQ}, "
             f"{BATCH} pairs a step, {a.steps} steps, {a.rounds} rounds alternating, {os.cpu_count()} CPU cores, fp32",
             "", "| system | tokens/s (loop) | peak RSS (MiB) | wall s (load, precompute, train) |", "|---|---|---|---|"]
    for s, name in SYSTEMS.items():
        lines.append(f"| {name} | {span([r['tokens_per_s'] for r in results[s]])} | "
                     f"{span([r['peak_rss_mib'] for r in results[s]])} | {span([r['wall_s'] for r in results[s]])} |")
    for ours, theirs in (("unitune", "trl"), ("unitune-pre", "trl-pre"), ("unitune", "trl-pre")):
        u, t = results[ours], results[theirs]
        lines.append(f"| ratio {ours} / {theirs} | {ratios(u, t, 'tokens_per_s')} | {ratios(u, t, 'peak_rss_mib')} | "
                     f"{ratios(u, t, 'wall_s')} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "dpo_cpu.md").write_text(text)
    (ROOT / "benchmarks" / "results" / "dpo_cpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
