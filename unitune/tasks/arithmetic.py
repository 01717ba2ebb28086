"""A verifiable task for online RL: small sums, differences and products, the answer checked by code.

    "What is 47 + 38? Reply with the number only."  -> "85"

SmolLM2-135M-Instruct gets some right and wraps many in prose; rewards computed from the completion
(`correct`: the last number in it is the answer; `exact`: the completion is the number and nothing
else) teach both, with no answer ever shown to the model.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from unitune.tasks.orders import _write_splits

NUMBER = re.compile(r"-?\d+")


def make_row(rng: random.Random, held_out: bool) -> dict:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    shown = {"+": "+", "-": "-", "*": "x"}[op]
    return {"prompt": f"What is {a} {shown} {b}? Reply with the number only.", "answer": str(answer)}


def write(out_dir: str | Path, n_train: int = 400, n_val: int = 64, seed: int = 2468) -> Path:
    return _write_splits(out_dir, n_train, n_val, seed, make_row)


def correct(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1 when the last number in the completion is the answer ("73 - 25 = 48" counts)."""
    return [float(bool(ns := NUMBER.findall(c)) and ns[-1] == a) for c, a in zip(completions, answer)]


def exact(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1 when the completion is the answer and nothing else (a trailing full stop allowed)."""
    return [float(c.strip().rstrip(".") == a) for c, a in zip(completions, answer)]


def _wrong(rng: random.Random, answer: int) -> int:
    """A near miss, as a small model makes them: off by a little, or by ten."""
    return answer + rng.choice([-10, -2, -1, 1, 2, 10])


def _pair_row(rng: random.Random, held_out: bool) -> dict:
    row = make_row(rng, held_out)
    answer = int(row["answer"])
    wrong = _wrong(rng, answer)
    question = row["prompt"].split("?")[0].removeprefix("What is ")
    kind = rng.randrange(3)
    if kind == 0:    # right against wrong, both as the number alone
        chosen, rejected = str(answer), str(wrong)
    elif kind == 1:  # right against wrong, both worked out
        chosen, rejected = f"{question} = {answer}", f"{question} = {wrong}"
    else:            # the number alone against the same number wrapped in prose
        chosen, rejected = str(answer), f"Sure! {question} equals {answer}. Let me know if you need anything else."
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "answer": row["answer"]}


def write_preferences(out_dir: str | Path, n_train: int = 800, n_val: int = 64, seed: int = 1357) -> Path:
    """Preference pairs for a reward model of the task: the right answer over a near miss, and the number
    alone over prose around it. The reward model then scores PPO's completions (recipes/ppo.yaml)."""
    return _write_splits(out_dir, n_train, n_val, seed, _pair_row)
