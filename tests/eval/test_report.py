"""What a run shows: report.md with its plots, TensorBoard event files, and `unitune report` across runs."""
from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import unitune
from unitune.cli import main


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def _logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_plots_and_the_same_scalars_for_tensorboard(tiny_recipe):
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 4, "eval_every": 2}}
    run = unitune.train(recipe)
    for png in ("loss.png", "metrics.png", "before_after.png"):
        assert (run.dir / png).stat().st_size > 1000
        assert f"]({png})" in (run.dir / "report.md").read_text()
    acc = _events(run.dir)
    logged = _logged(run.dir)
    train = [r for r in logged if r["split"] == "train"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    val = [r for r in logged if r["split"] == "val"]
    assert [e.step for e in acc.Scalars("val/exact_match")] == [0, 2, 4] == [r["step"] for r in val]
    assert [e.value for e in acc.Scalars("val/val_loss")] == pytest.approx([r["val_loss"] for r in val], rel=1e-6)


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tiny_recipe, train_crashing_at):
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 8, "save_every": 3},
              "eval": {"before": False, "generate": 0}}
    train_crashing_at(recipe, 6)  # steps 4-6 logged, their checkpoint never written
    run = unitune.train(recipe, resume=True)
    loss = _events(run.dir).Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))  # the interrupted run's 4-6 purged, the resumed ones kept
    logged = {r["step"]: r["loss"] for r in _logged(run.dir) if r["split"] == "train"}
    assert [e.value for e in loss] == pytest.approx([logged[s] for s in range(1, 9)], rel=1e-6)


def test_report_compares_runs_side_by_side(tiny_recipe, tmp_path, capsys):
    base = {**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 4, "eval_every": 2}}
    slow = unitune.train({**base, "output": {**base["output"], "name": "slow"}})
    fast = unitune.train({**base, "train": {**base["train"], "lr": 5e-2}, "output": {**base["output"], "name": "fast"}})
    capsys.readouterr()
    assert main(["report", str(slow.dir), str(fast.dir), "-o", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| | slow | fast |" in report
    assert "| train.lr | 0.0100 | 0.0500 |" in report  # the only recipe field that differs
    assert "| train.seed |" not in report
    row = next(line for line in report.splitlines() if line.startswith("| val_loss |"))
    assert row == f"| val_loss | {slow.metrics['val_loss']:.4f} | {fast.metrics['val_loss']:.4f} |"
    assert "| tokens_per_s |" in report and (tmp_path / "cmp" / "curves.png").stat().st_size > 1000
    assert "| train.lr |" in capsys.readouterr().out

    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
