"""Generation through an adapter against the same model merged: rollouts are online RL's hot path.

SmolLM2-135M-Instruct with a LoRA adapter (r16, all linear layers, B non-zero as after training),
batched greedy generation with a KV cache (batch 8, 64 new tokens, no early stop), three ways:
unitune's LoRA layers as they run in training; the adapter merged into the weights; and PEFT's
LoRA on the same weights for reference. Each in its own process, alternating order, several rounds;
the target is the adapter within 10% of the merged model's tokens/s.

    python benchmarks/generation.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from pathlib import Path

from sft_lora_cpu import model_dir
from spawn import alternate, span

ROOT = Path(__file__).resolve().parents[1]
BATCH, NEW, R = 8, 64, 16
SYSTEMS = {"adapter": "unitune LoRA, unmerged", "rollout": "unitune LoRA under for_generation (GRPO's rollouts)",
           "merged": "merged into the weights", "peft": "PEFT LoRA, unmerged"}


def worker(system: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unitune.methods import lora
    from unitune.tasks.orders import INSTRUCTION, make_row
    import random

    torch.manual_seed(0)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if system == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets))
    else:
        model = lora.apply(model, lora.Config(r=R, alpha=2 * R, target_modules=targets))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    if system == "merged":
        model = lora.merge_and_unload(model)
    model.eval()
    rng = random.Random(0)
    texts = [tok.apply_chat_template([{"role": "user", "content": f"{INSTRUCTION}\n\n{make_row(rng, True)['input']}"}],
                                     tokenize=False, add_generation_prompt=True) for _ in range(BATCH)]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id, use_cache=True)
    folded = lora.for_generation(model) if system == "rollout" else contextlib.nullcontext()
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        t0 = time.perf_counter()  # the fold is inside the timing, as each rollout pays it
        with folded:
            out = model.generate(**enc, **kw)
        seconds = time.perf_counter() - t0
    new = (out.shape[1] - enc["input_ids"].shape[1]) * BATCH
    print("RESULT " + json.dumps({"tokens_per_s": new / seconds,
                                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    os.environ.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    model_dir()
    results = alternate(__file__, list(SYSTEMS), a.rounds, [])
    lines = [f"Greedy generation, SmolLM2-135M-Instruct + LoRA r{R} all linear layers, batch {BATCH}, {NEW} new tokens, "
             f"{a.rounds} rounds alternating, {os.cpu_count()} CPU cores, fp32", "",
             "| system | tokens/s | ratio to merged (same round) |", "|---|---|---|"]
    for s, name in SYSTEMS.items():
        ratios = [x["tokens_per_s"] / m["tokens_per_s"] for x, m in zip(results[s], results["merged"])]
        lines.append(f"| {name} | {span([r['tokens_per_s'] for r in results[s]], '.1f')} | {span(ratios, '.2f')}x |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (ROOT / "benchmarks" / "results" / "generation.md").write_text(text)


if __name__ == "__main__":
    main()
