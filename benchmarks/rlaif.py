"""The RLAIF loop, measured: the model writes, an AI judge with order swapping picks, DPO learns from
the verdicts, and the judge compares the tuned model with the base.

1. SmolLM2-135M-Instruct samples two answers (temperature 0.9) to each of 160 order prompts;
2. the judge (the reward model of recipes/reward.yaml, `--judge reward:...`; trained first if absent)
   judges every pair in both orders, dropping inconsistent verdicts; its bias report is kept;
3. DPO (recipes/dpo.yaml: LoRA, rpo_alpha 1) trains on the judged pairs, validated on held-out pairs;
4. base and tuned answer 48 unseen prompts greedily; the judge picks between them, in both orders:
   the tuned model's win rate, beside the judge's bias figures and held-out exact match.

    python benchmarks/rlaif.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "rlaif"
JUDGE_RUN = ROOT / "runs" / "reward"


def answers(target: str | Path, prompts: list[str], temperature: float, n: int = 1) -> list[list[str]]:
    import unitune
    from unitune.generation import generate

    loaded = unitune.load_run_or_model(target)
    convs = [[{"role": "user", "content": p}] for p in prompts for _ in range(n)]
    out = generate(loaded.model, loaded.tokenizer, convs, max_new_tokens=64, temperature=temperature, batch_size=32,
                   progress=True)
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


def main() -> None:
    import torch

    import unitune
    from unitune.feedback import judge
    from unitune.tasks import orders

    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not (JUDGE_RUN / "adapter").is_dir():
        unitune.train(str(ROOT / "recipes" / "reward.yaml"), ["output.overwrite=true"])
    spec = f"reward:{JUDGE_RUN}"
    orders.write_prompts(OUT / "prompts", n_train=160, n_val=48)
    rows = [json.loads(line) for line in (OUT / "prompts" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (OUT / "prompts" / "val.jsonl").read_text().splitlines()]

    # 1-2: the base model's own answers, judged
    samples = answers("smollm2-135m-instruct", [r["prompt"] for r in rows], 0.9, n=2)
    (OUT / "samples.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "a": s[0], "b": s[1]}) + "\n"
                                               for r, s in zip(rows, samples)))
    bias = judge.run(OUT / "samples.jsonl", spec, OUT / "judged.jsonl", with_report=True)

    # 3: DPO on the verdicts
    orders.write_preferences(OUT / "pairs", n_train=8, n_val=64)  # held-out pairs with the right answer
    run = unitune.train(str(ROOT / "recipes" / "dpo.yaml"), [
        f"data.train={OUT / 'judged.jsonl'}", f"data.validation={OUT / 'pairs' / 'val.jsonl'}", "data.generator=null",
        "output.name=rlaif-dpo", "output.overwrite=true", "train.eval_every=null"])

    # 4: tuned against base on unseen prompts, judged in both orders (a: tuned, b: base, shuffled per row)
    base = answers("smollm2-135m-instruct", [r["prompt"] for r in held], 0.0)
    tuned = answers(run.dir, [r["prompt"] for r in held], 0.0)
    rng = random.Random(0)
    duel = []
    for r, t, b in zip(held, tuned, base):
        first = rng.random() < 0.5
        duel.append({"prompt": r["prompt"], "a": t[0] if first else b[0], "b": b[0] if first else t[0], "tuned": "a" if first else "b"})
    (OUT / "duel.jsonl").write_text("".join(json.dumps(d) + "\n" for d in duel))
    final = judge.run(OUT / "duel.jsonl", spec, OUT / "duel.judged.jsonl", with_report=True)
    verdicts = [json.loads(line) for line in (OUT / "duel.judged.jsonl").read_text().splitlines()]
    wins = sum(v["winner"] == duel[v["index"]]["tuned"] for v in verdicts)
    same = sum(d["a"].strip() == d["b"].strip() for d in duel)
    result = {"judge_bias_on_samples": bias, "pairs_trained": run.stats["train_examples"],
              "exact_match": [run.before.get("exact_match"), run.metrics.get("exact_match")],
              "tuned_wins": wins, "decided": len(verdicts), "identical_answers": same,
              "win_rate": wins / max(len(verdicts), 1), "judge_bias_on_duel": final}
    (ROOT / "benchmarks" / "results" / "rlaif.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("judge")}, indent=1))
    print("judge on samples:", json.dumps(bias))


if __name__ == "__main__":
    main()
