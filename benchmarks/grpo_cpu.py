"""GRPO with LoRA on SmolLM2-135M-Instruct: unitune vs transformers + PEFT + TRL's GRPOTrainer.

Same weights, same prompts (the order task, as one user message so both apply the chat template),
same reward function (code-checked partial credit, unitune.tasks.orders:field_reward), group size,
completions per step, completion length, temperature, learning rate, loss type (dapo), beta 0, LoRA
rank and targets; fp32 on a CPU without native bf16 in both; TRL generates with transformers'
generate and a KV cache (its CPU path; vLLM needs a GPU). Each system in its own process,
alternating order, several rounds. Steps per hour from the training loop's wall time (generation
included), generation tokens/s from the time spent in generate(), peak RSS of the process.

    python benchmarks/grpo_cpu.py [--rounds 2] [--steps 6]
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
GROUP, PROMPTS, NEW, LR, R, ALPHA = 8, 2, 48, 2e-4, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEMS = {"unitune": "unitune", "trl": "transformers + PEFT + TRL GRPOTrainer"}


def prompts_file(bench: Path) -> Path:
    from unitune.tasks import orders

    orders.write_prompts(bench / "prompts", n_train=64, n_val=0)
    return bench / "prompts" / "train.jsonl"


def run_unitune(data: Path, steps: int) -> dict:
    import unitune

    recipe = {
        "model": {"name": model_dir()},
        "data": {"train": str(data), "max_length": 256},
        "method": {"name": "lora", "r": R, "alpha": ALPHA, "target_modules": TARGETS},
        "objective": {"name": "grpo", "rewards": [{"function": "unitune.tasks.orders:field_reward"}],
                      "num_generations": GROUP, "max_new_tokens": NEW, "temperature": 1.0, "loss_type": "dapo"},
        "train": {"steps": steps, "batch_size": GROUP * PROMPTS, "lr": LR, "warmup_steps": 0, "schedule": "constant",
                  "precision": "fp32"},  # as the peer runs (bf16=False), whatever this CPU supports
        "eval": {"before": False},
        "output": {"dir": str(data.parent.parent), "name": "unitune", "overwrite": True},
    }
    run = unitune.train(recipe)
    train = [r for r in run.history if r["split"] == "train"]
    return {"loop_s": train[-1]["elapsed_s"], "gen_tokens_per_s": sum(r["gen_tokens_per_s"] for r in train) / len(train),
            "reward": train[-1]["reward"]}


def run_trl(data: Path, steps: int) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from unitune.tasks.orders import field_reward

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("json", data_files=str(data), split="train")
    ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})

    def reward(prompts, completions, answer, **_):  # TRL hands conversational completions as messages
        return field_reward(prompts, [c[0]["content"] for c in completions], answer)

    timer = trl_timer()
    args = GRPOConfig(
        output_dir=str(data.parent.parent / "trl"), max_steps=steps, per_device_train_batch_size=GROUP * PROMPTS,
        num_generations=GROUP, max_completion_length=NEW, temperature=1.0, learning_rate=LR, loss_type="dapo", beta=0.0,
        lr_scheduler_type="constant", warmup_steps=0, bf16=False, fp16=False, use_cpu=True, logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, gradient_checkpointing=False,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[timer], peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    generated = {"tokens": 0, "s": 0.0}
    real_generate = trainer.model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = real_generate(*a, **kw)
        generated["s"] += time.perf_counter() - t0
        prompt = kw.get("input_ids", a[0] if a else None)
        completion = out[:, prompt.shape[1]:]
        generated["tokens"] += int((completion != tok.pad_token_id).sum())
        return out

    trainer.model.generate = timed_generate
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"loop_s": timer.end - timer.start, "gen_tokens_per_s": generated["tokens"] / max(generated["s"], 1e-9),
            "reward": logs[-1]["reward"]}


def worker(system: str, steps: int) -> None:
    data = Path(os.environ["BENCH_DIR"]) / "prompts" / "train.jsonl"
    result = (run_trl if system == "trl" else run_unitune)(data, steps)
    result["steps_per_hour"] = steps * 3600 / result["loop_s"]
    report(result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.steps)
    bench = ROOT / "runs" / "bench-grpo"
    bench.mkdir(parents=True, exist_ok=True)
    os.environ.update(BENCH_DIR=str(bench), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    prompts_file(bench)
    model_dir()
    results = alternate(__file__, list(SYSTEMS), a.rounds, ["--steps", str(a.steps)])
    u, t = results["unitune"], results["trl"]

    lines = [f"GRPO (dapo, beta 0), SmolLM2-135M-Instruct + LoRA r{R} all linear layers, {PROMPTS} prompts x {GROUP} "
             f"completions a step, {NEW} new tokens max, {a.steps} steps, {a.rounds} rounds alternating, "
             f"{os.cpu_count()} CPU cores, fp32", "",
             "| system | steps/hour | generation tokens/s | peak RSS (MiB) |", "|---|---|---|---|"]
    for s, name in SYSTEMS.items():
        lines.append(f"| {name} | {span([r['steps_per_hour'] for r in results[s]])} | "
                     f"{span([r['gen_tokens_per_s'] for r in results[s]], '.1f')} | "
                     f"{span([r['peak_rss_mib'] for r in results[s]])} |")
    lines.append(f"| ratio unitune / trl | {ratios(u, t, 'steps_per_hour')} | {ratios(u, t, 'gen_tokens_per_s')} | "
                 f"{ratios(u, t, 'peak_rss_mib')} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (ROOT / "benchmarks" / "results" / "grpo_cpu.md").write_text(text)
    (ROOT / "benchmarks" / "results" / "grpo_cpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
