"""DP-SGD: each example's gradient clipped and summed as Opacus computes it (PEFT LoRA under Opacus's
per-sample hooks as the reference), noise and accounting, Poisson sampling, exact resume, and the refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch

import unitune
from unitune.config import RecipeError


def _private(tiny_recipe, name="dp", **privacy):
    return {**tiny_recipe, "method": {**tiny_recipe["method"], "dropout": 0.0},
            "train": {**tiny_recipe["train"], "steps": 6, "batch_size": 4, "save_every": 2},
            "eval": {"before": False, "generate": 0},
            "output": {**tiny_recipe["output"], "name": name},
            "privacy": {"noise_multiplier": 1.0, **privacy}}


def _log(run_dir, split="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_a_private_run_logs_the_epsilon_it_spends_and_the_report_states_it(tiny_recipe):
    run = unitune.train(_private(tiny_recipe))
    log = _log(run.dir)
    eps = [r["epsilon"] for r in log]
    assert len(eps) == 6 and all(b > a > 0 for a, b in zip(eps, eps[1:]))  # spent step by step
    assert all(0 <= r["clipped"] <= 1 for r in log)
    assert "epsilon" in (run.dir / "report.md").read_text()
