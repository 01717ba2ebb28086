"""Forgetting, measured: retention sets evaluated before and after, their drop in the report."""
from __future__ import annotations

import json

import pytest
import torch

import unitune
from unitune.config import RecipeError
from unitune.data.files import DataError
from unitune.eval import retention
from unitune.tasks import retention as general


def test_a_retention_set_is_measured_at_every_evaluation_and_its_drop_reported(tiny_recipe, tmp_path):
    kept = tmp_path / "kept.jsonl"
    kept.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n"
                            for w in ("yes", "no", "maybe", "hello")))
    recipe = {**tiny_recipe, "eval": {**tiny_recipe["eval"], "retention": [str(kept)]},
              "train": {**tiny_recipe["train"], "steps": 6, "eval_every": 3, "lr": 3e-2}}
    run = unitune.train(recipe)
    evals = [r for r in run.history if r.get("split") == "val"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert {"retain_kept_loss", "retain_kept_contains_match", "retain_kept_exact_match"} <= r.keys()
        assert 0.0 <= r["retain_kept_contains_match"] <= 1.0 and r["retain_kept_loss"] > 0
    # training on other rows moves the retention set's answer loss: it is measured on the live model
    assert run.metrics["retain_kept_loss"] != pytest.approx(run.before["retain_kept_loss"], rel=1e-4)
    report = (run.dir / "report.md").read_text()
    assert "| retain_kept_loss |" in report and "forgetting: retention set 'kept'" in report
    # `unitune eval` measures them too, for the base and the tuned model alike
    results = unitune.evaluate(recipe, run=run.dir)
    assert results["base"]["retain_kept_loss"] == pytest.approx(run.before["retain_kept_loss"], rel=1e-4)
    assert results["tuned"]["retain_kept_loss"] == pytest.approx(run.metrics["retain_kept_loss"], rel=1e-4)


def test_the_loss_is_the_answers_mean_token_loss(tiny_recipe, tmp_path):
    """retain_<set>_loss equals the SFT validation loss of the same rows (both: mean over answer tokens)."""
    rows = tmp_path / "same.jsonl"
    rows.write_text(open(tiny_recipe["data"]["validation"]).read())
    recipe = {**tiny_recipe, "eval": {**tiny_recipe["eval"], "generate": 0, "retention": [str(rows)]},
              "train": {**tiny_recipe["train"], "steps": 1, "precision": "fp32"}}
    run = unitune.train(recipe)
    assert run.before["retain_same_loss"] == pytest.approx(run.before["val_loss"], rel=1e-5)


def test_the_general_set_is_built_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = general.rows()
    assert len(rows) == 40 and {"instruction": "What is the capital of Italy? Answer in one word.",
                                "output": "Rome"} in rows
    path = general.write(tmp_path / "g")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_retention_needs_a_language_model_and_readable_rows(tiny_recipe, tmp_path):
    from unitune.config import load_recipe

    recipe = load_recipe({**tiny_recipe, "eval": {"retention": [str(tmp_path / "missing.jsonl")]}})
    with pytest.raises(DataError, match="not found"):
        retention.load_sets(recipe, None)
    image = load_recipe({"model": {"name": "resnet18", "weights": "none"}, "objective": {"name": "classify"},
                         "eval": {"retention": ["general"]}})
    with pytest.raises(RecipeError, match="eval.retention"):
        retention.load_sets(image, None)


def test_summary_states_the_drop_beside_the_gain():
    before = {"exact_match": 0.0, "val_loss": 0.5, "retain_general_contains_match": 0.6, "retain_general_loss": 1.0}
    after = {"exact_match": 0.8, "val_loss": 0.1, "retain_general_contains_match": 0.25, "retain_general_loss": 2.5}
    [line] = retention.summary(before, after)
    assert "0.600 -> 0.250 (-0.350 contains match" in line and "exact_match went 0.000 -> 0.800" in line
