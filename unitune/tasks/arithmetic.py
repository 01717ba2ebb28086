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
