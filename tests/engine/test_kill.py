"""SIGKILL a real `unitune train` process at several moments, resume, and end where an uninterrupted
run ends; no file the run directory holds is ever unreadable."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import unitune
from unitune.cli import main
from unitune.config import RecipeError
from unitune.engine import checkpoint


def _recipe(tiny_recipe: dict, name: str) -> dict:
    return {**tiny_recipe, "method": {**tiny_recipe["method"], "dropout": 0.1},
            "train": {**tiny_recipe["train"], "steps": 14, "grad_accum": 2, "save_every": 1, "eval_every": 5},
            "eval": {"before": False, "generate": 0},
            "output": {**tiny_recipe["output"], "name": name}}


def _start(recipe_file: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "unitune", "train", str(recipe_file)] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=recipe_file.parent)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the moment to kill")
        time.sleep(0.001)


def _readable(path: Path) -> None:
    """Open every file the way its reader would."""
    suffix = path.suffix
    if suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".jsonl":
        for line in path.read_text().splitlines():
            json.loads(line)
    elif suffix == ".safetensors":
        load_file(path)
    elif suffix == ".pt":
        torch.load(path, weights_only=True)
    elif suffix == ".yaml":
        yaml.safe_load(path.read_text())
    elif suffix == ".png":
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elif path.name.startswith("events.out.tfevents."):  # TensorBoard's reader skips a torn last record
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        assert any(e.summary.value for e in EventFileLoader(str(path)).Load()) or path.stat().st_size < 200
    else:
        path.read_text(encoding="utf-8")


def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tiny_recipe, tmp_path):
    straight = unitune.train(_recipe(tiny_recipe, "straight"))

    recipe_file = tmp_path / "killed.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(tiny_recipe, "killed")))
    run_dir = Path(tiny_recipe["output"]["dir"]) / "killed"
    ckpts = run_dir / "checkpoints"

    def saved_past(n):
        return lambda: any(s > n for s in checkpoint.list_checkpoints(ckpts))

    def mid_save():  # a checkpoint directory being written under its temporary name
        return ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir())

    rng = random.Random(0)
    moments = [
        ("after the first checkpoint", saved_past(0), 0.0),
        ("during a checkpoint write", mid_save, 0.0),
        ("at a random moment", saved_past(6), rng.uniform(0.0, 0.2)),
        ("during a checkpoint write", mid_save, 0.0),
    ]
    kills = 0
    for what, ready, delay in moments:
        before = checkpoint.list_checkpoints(ckpts)
        proc = _start(recipe_file, resume=bool(before))
        _wait_for(proc, (lambda r=ready, b=before: r() and checkpoint.list_checkpoints(ckpts) != b) if before else ready)
        time.sleep(delay)
        if proc.poll() is not None:
            break  # the run finished before this moment came: nothing left to kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        print(f"killed {what} (checkpoints {checkpoint.list_checkpoints(ckpts)})")
        for f in run_dir.rglob("*"):  # a kill may leave temp names, but every real file is whole
            rel = str(f.relative_to(run_dir))
            if f.is_file() and ".tmp" not in rel and ".old" not in rel:
                if f.suffix == ".jsonl":  # the log may end in a torn line, which resume drops
                    lines = f.read_text().splitlines()
                    [json.loads(line) for line in lines[:-1]]
                else:
                    _readable(f)
    assert kills >= 3

    done = subprocess.run([sys.executable, "-m", "unitune", "train", str(recipe_file), "--resume"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    a = load_file(straight.output / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 15))
    losses = {r["step"]: r["loss"] for r in straight.history if r["split"] == "train"}
    assert all(abs(r["loss"] - losses[r["step"]]) < 1e-6 for r in records if r["split"] == "train")
    leftovers = [p.name for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert not leftovers
    for f in run_dir.rglob("*"):
        if f.is_file():
            _readable(f)


def _run_with_checkpoints(tiny_recipe) -> dict:
    recipe = _recipe(tiny_recipe, "changed")
    recipe["train"] = {**recipe["train"], "steps": 4, "save_every": 2}
    unitune.train(recipe)
    return recipe


def test_resume_refuses_a_changed_trajectory_unless_forced(tiny_recipe, tmp_path, capsys):
    recipe = _run_with_checkpoints(tiny_recipe)
    with pytest.raises(RecipeError, match=r"train\.lr: 0\.01 -> 0\.02.*--force"):
        unitune.train(recipe, ["train.lr=0.02"], resume=True)
    unitune.train(recipe, ["train.log_every=2", "eval.generate=0"], resume=True)  # what is logged: fine
    recipe_file = tmp_path / "changed.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(recipe_file), "train.lr=0.02", "--resume"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["train", str(recipe_file), "train.lr=0.02", "--resume", "--force"]) == 0
    run_dir = Path(recipe["output"]["dir"]) / recipe["output"]["name"]
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["lr"] == 0.02


def test_resume_refuses_changed_data_unless_forced(tiny_recipe, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(Path(tiny_recipe["data"]["train"]).read_text())
    recipe = _run_with_checkpoints({**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(data)}})
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
    with pytest.raises(RecipeError, match=r"data\.train .* changed"):
        unitune.train(recipe, resume=True)
    unitune.train(recipe, resume=True, force=True)
