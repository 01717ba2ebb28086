"""LoRA SFT on SmolLM2-135M-Instruct: unitune vs transformers + PEFT + TRL's SFTTrainer, side by side.

Same model weights (the cached safetensors copy of the GGUF), same rows (the quickstart task),
same sequence length, batch, steps, learning rate, LoRA rank and targets, loss on the completion
only in both, packing in both (TRL: best-fit-decreasing packing, padding-free), fp32 on a CPU
without native bf16 in both. Each system runs in its own process, alternating, several rounds;
we report the range of each figure and of the ratios.

    python benchmarks/sft_lora_cpu.py [--rounds 2] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from spawn import alternate, ratios, report, span, trl_timer

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, LR, R, ALPHA = 512, 2, 1e-3, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_dir() -> str:
    from unitune.config import ModelConfig
    from unitune.models.loader import _gguf_cache, _locate

    return str(_gguf_cache(*_locate(ModelConfig())))


def rows(n: int) -> list[dict]:
    from unitune.tasks.orders import make_row
    import random

    rng = random.Random(0)
    return [make_row(rng, held_out=False) for _ in range(n)]


def run_unitune(steps: int, lean: bool = False) -> dict:
    import torch

    import unitune

    data = Path(os.environ["BENCH_DIR"]) / "train.jsonl"
    recipe = {
        "model": {"name": model_dir()},
        "data": {"train": str(data), "format": "instruction", "max_length": SEQ, "packing": True},
        "method": {"name": "lora", "r": R, "alpha": ALPHA, "target_modules": TARGETS},
        "train": {"steps": steps, "batch_size": BATCH, "lr": LR, "warmup_steps": 0, "schedule": "constant",
                  "precision": "fp32", "lean_cpu_memory": lean},  # as the peer runs (bf16=False)
        "eval": {"before": False, "generate": 0},
        "output": {"dir": os.environ["BENCH_DIR"], "name": "unitune", "overwrite": True},
    }
    torch.manual_seed(0)
    run = unitune.train(recipe)
    train = [r for r in run.history if r["split"] == "train"]  # tokens_per_s: from the loop's start to this step
    return {"tokens_per_s": train[-1]["tokens_per_s"], "final_loss": train[-1]["loss"]}


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    # Prompt-completion rows, so TRL puts loss on the completion only, as unitune does.
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                             "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows(800)])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    timer = trl_timer()
    args = SFTConfig(
        output_dir=os.path.join(os.environ["BENCH_DIR"], "trl"), max_steps=steps,
        per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_length=SEQ, packing=True, completion_only_loss=True, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0),
                         callbacks=[timer])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    return {"tokens_per_s": logs[-1]["num_tokens"] / (timer.end - timer.start), "final_loss": logs[-1]["loss"]}


def worker(system: str, steps: int) -> None:
    result = run_trl(steps) if system == "trl" else run_unitune(steps, lean=system == "unitune-lean")
    report(result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.steps)
    bench = ROOT / "runs" / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    (bench / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(800)))
    model_dir()  # convert the GGUF once, outside the timings
    os.environ.update(BENCH_DIR=str(bench), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    systems = ["unitune", "unitune-lean", "trl"]
    results = alternate(__file__, systems, a.rounds, ["--steps", str(a.steps)])

    print(f"\nLoRA SFT, SmolLM2-135M-Instruct, r={R} all linear layers, seq {SEQ}, batch {BATCH} packed rows, "
          f"{a.steps} steps, {a.rounds} rounds alternating, {os.cpu_count()} CPU cores\n")
    print("| system | tokens/s | peak RSS (MiB) |\n|---|---|---|")
    names = {"unitune": "unitune", "unitune-lean": "unitune, train.lean_cpu_memory=true",
             "trl": "transformers + PEFT + TRL SFTTrainer"}
    for s in systems:
        print(f"| {names[s]} | {span([r['tokens_per_s'] for r in results[s]])} | "
              f"{span([r['peak_rss_mib'] for r in results[s]])} |")
    for s in systems[:2]:
        print(f"| ratio {s} / trl | {ratios(results[s], results['trl'], 'tokens_per_s')} | "
              f"{ratios(results[s], results['trl'], 'peak_rss_mib')} |")


if __name__ == "__main__":
    main()
