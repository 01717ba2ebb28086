"""Crash, resume, NaN: nothing is lost and a resumed run ends where an uninterrupted one does."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unitune
from unitune.engine import checkpoint
from unitune.engine.loop import NonFiniteLoss
from unitune.objectives import sft


class Crash(Exception):
    pass


def _resume_recipe(tiny_recipe):
    r = dict(tiny_recipe)
    r["method"] = {**r["method"], "dropout": 0.1}  # dropout makes the RNG state matter
    r["train"] = {**r["train"], "steps": 8, "grad_accum": 2, "save_every": 3}
    r["eval"] = {"before": False, "generate": 0}
    return r


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_recipe, train_crashing_at):
    recipe = _resume_recipe(tiny_recipe)
    full = unitune.train({**recipe, "output": {**recipe["output"], "name": "straight"}})

    crashed = {**recipe, "output": {**recipe["output"], "name": "crashed"}}
    train_crashing_at(crashed, 6)  # steps 4-6 are logged but their checkpoint never written: resume must drop them
    log = Path(crashed["output"]["dir"]) / "crashed" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()][-1] == 6
    resumed = unitune.train(crashed, resume=True)

    assert resumed.dir == full.dir.with_name("crashed")
    a = load_file(full.output / "adapter_model.safetensors")
    b = load_file(resumed.output / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [r["step"] for r in resumed.history if r["split"] == "train"]
    assert steps == list(range(1, 9))  # the log holds each step once, none lost or doubled
    losses = {r["step"]: r["loss"] for r in full.history if r["split"] == "train"}
    assert all(abs(r["loss"] - losses[r["step"]]) < 1e-6 for r in resumed.history if r["split"] == "train")


def test_crash_mid_save_keeps_the_last_good_checkpoint(tiny_recipe, monkeypatch):
    recipe = _resume_recipe(tiny_recipe)
    real = checkpoint.save_file

    def flaky(tensors, path, *a, **k):
        if "step-6" in str(path):
            raise Crash("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    with pytest.raises(Crash):
        unitune.train(recipe)
    ckpt_dir = Path(tiny_recipe["output"]["dir"]) / "tiny" / "checkpoints"
    assert checkpoint.list_checkpoints(ckpt_dir) == [3]
    assert load_file(ckpt_dir / "step-3" / "weights.safetensors")  # intact and readable


def test_nan_loss_stops_with_a_message(tiny_recipe, monkeypatch):
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "save_every": 1}, "eval": {"before": False, "generate": 0}}
    real = sft.loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        total, info = real(*args)
        return (total * float("nan") if calls["n"] == 3 else total), info

    monkeypatch.setattr(sft, "loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 3.*step-2"):
        unitune.train(recipe)


def test_non_finite_gradient_stops_before_the_optimizer_step(tiny_recipe, monkeypatch):
    """A finite loss whose gradient is NaN must not reach the weights or a checkpoint."""
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "save_every": 1, "max_grad_norm": None},
              "eval": {"before": False, "generate": 0}}
    real = sft.loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        total, info = real(*args)
        if calls["n"] == 3:
            total.register_hook(lambda g: g * float("nan"))
        return total, info

    monkeypatch.setattr(sft, "loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"gradient norm became nan at step 3.*step-2"):
        unitune.train(recipe)
    ckpt_dir = Path(tiny_recipe["output"]["dir"]) / "tiny" / "checkpoints"
    assert checkpoint.list_checkpoints(ckpt_dir) == [1, 2]
    weights = load_file(ckpt_dir / "step-2" / "weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
