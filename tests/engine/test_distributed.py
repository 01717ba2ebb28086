"""Data parallelism: 2 processes (torchrun, gloo) equal 1 process with the same global batch, and a killed
2-process run resumes on 1 process."""
from __future__ import annotations

import contextlib
import json
import os
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


def _recipe(tiny_recipe, name: str, **train) -> dict:
    return {**tiny_recipe, "method": {**tiny_recipe["method"], "dropout": 0.0},  # no RNG: the runs can be equal
            "train": {**tiny_recipe["train"], "steps": 4, "batch_size": 3, "grad_accum": 2, "lr": 1e-2,
                      "precision": "fp32", "device": "cpu", **train},
            "eval": {"before": False, "generate": 3, "max_new_tokens": 6, "batch_size": 2},  # split between processes
            "output": {**tiny_recipe["output"], "name": name}}


def _torchrun(recipe: dict, tmp_path: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    path = tmp_path / f"{recipe['output']['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = subprocess.run([sys.executable, "-m", "unitune", "train", str(path), "--nproc", str(nproc), *args],
                          capture_output=True, text=True, timeout=600)
    return done


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.mark.parametrize("batch_size,grad_accum,strategy", [
    (3, 2, "ddp"), (47, 1, "ddp"),  # accumulation; a last batch of one row
    (3, 2, "fsdp")])  # sharded: the same figures
def test_two_processes_equal_one_with_the_same_global_batch(tiny_recipe, tmp_path, batch_size, grad_accum, strategy):
    shape = {"batch_size": batch_size, "grad_accum": grad_accum, "distributed": strategy}
    one = unitune.train(_recipe(tiny_recipe, "one", **shape))
    done = _torchrun(_recipe(tiny_recipe, "two", **shape), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two_dir = one.dir.with_name("two")
    assert ("unitune: fsdp: 2 blocks and the root sharded over 2 processes" in done.stdout) == (strategy == "fsdp")
    assert not two_dir.with_name("two-2").exists()  # both processes wrote to the one run directory
    a, b = _train_losses(one.dir), _train_losses(two_dir)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
    wa, wb = load_file(one.output / "adapter_model.safetensors"), load_file(two_dir / "adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4)
    one_log = [json.loads(x) for x in (one.dir / "metrics.jsonl").read_text().splitlines()]
    two_log = [json.loads(x) for x in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two_log] == [r["step"] for r in one_log]  # one log, written once, by rank 0
    # the evaluation, split between the processes, gives the same figures as one process
    assert two_log[-1]["val_loss"] == pytest.approx(one_log[-1]["val_loss"], rel=1e-4)
    assert two_log[-1]["contains_match"] == one_log[-1]["contains_match"]
    assert (two_dir / "report.md").read_text().split("## Sample")[1] == (one.dir / "report.md").read_text().split(
        "## Sample")[1]  # the same three answers, in the same order


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_sharded_run_resumes_on_one_process_and_the_other_way(tiny_recipe, tmp_path, method):
    """FSDP checkpoints are consolidated: 2 sharded processes continue a 1-process run, 1 process continues a
    sharded one, and both end where an uninterrupted run does."""
    import shutil

    shape = {"steps": 4, "save_every": 2, "keep_checkpoints": 2}
    def recipe(name, **train):
        r = _recipe(tiny_recipe, name, **shape, **train)
        return {**r, "method": {"name": "full"}} if method == "full" else r

    straight = unitune.train(recipe("straight"))
    cut = lambda run: shutil.rmtree(run / "checkpoints" / "step-4")  # noqa: E731  (killed after step 3)
    shutil.copytree(straight.dir, straight.dir.with_name("onto-two"))
    cut(straight.dir.with_name("onto-two"))
    done = _torchrun(recipe("onto-two", distributed="fsdp"), tmp_path, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout and "fsdp:" in done.stdout
    done = _torchrun(recipe("sharded", distributed="fsdp"), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cut(straight.dir.with_name("sharded"))
    onto_one = unitune.train(recipe("sharded"), resume=True)
    output = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    want = load_file(straight.dir / output)
    for run in ("onto-two", "sharded"):
        losses = _train_losses(straight.dir.with_name(run))
        assert losses == pytest.approx(_train_losses(straight.dir), rel=1e-5), run
        got = load_file(straight.dir.with_name(run) / output)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)
    assert onto_one.dir == straight.dir.with_name("sharded")


def _running(arg: str) -> list[int]:
    """The processes whose command line holds `arg` (zombies excluded)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and arg.encode() in (proc / "cmdline").read_bytes() and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(proc.name))
    return pids


def test_a_two_process_run_killed_resumes_on_one_process(tiny_recipe, tmp_path):
    from unitune.engine import checkpoint

    recipe = _recipe(tiny_recipe, "moved", steps=30, save_every=2)
    straight = unitune.train(_recipe(tiny_recipe, "straight", steps=30, save_every=2))
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.Popen([sys.executable, "-m", "unitune", "train", str(path), "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = straight.dir.with_name("moved") / "checkpoints"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not [s for s in checkpoint.list_checkpoints(ckpts) if s >= 4]:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun, mid-run; its workers (in sessions of their own) follow it
    proc.wait()
    deadline = time.time() + 30
    while _running(str(path)) and time.time() < deadline:
        time.sleep(0.05)
    assert not _running(str(path)), "workers outlived their launcher"
    saved = checkpoint.list_checkpoints(ckpts)
    assert saved and saved[-1] < 30, saved  # killed before the end

    resumed = unitune.train(recipe, resume=True)
    losses = _train_losses(resumed.dir)
    assert sorted(losses) == list(range(1, 31))
    for step, loss in _train_losses(straight.dir).items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    wa = load_file(straight.output / "adapter_model.safetensors")
    wb = load_file(resumed.output / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4)


def test_each_process_collates_its_share_of_every_batch(tokenizer, orders_data):
    from unitune.config import DataConfig
    from unitune.data import Batches, build_data
    from unitune.objectives import sft

    data = build_data(DataConfig(train=str(orders_data / "train.jsonl"), max_length=256), tokenizer, 0, sft.example)
    make = lambda: Batches(data.train, 47, True, 256, 0, 0, sft.collate)  # noqa: E731  (48 rows: 47 + 1)
    whole, shares = make(), [make(), make()]
    for r, b in enumerate(shares):
        b.shard = (r, 2)
    ghosts = 0
    for _ in range(len(whole)):
        full = whole.next()
        parts = [b.next() for b in shares]
        rows = full["input_ids"].shape[0]
        if rows == 1:  # a short last batch: the second process gets a row to compute, weighted 0
            assert parts[1]["ghost"] and "ghost" not in parts[0]
            torch.testing.assert_close(parts[0]["input_ids"], full["input_ids"])
            ghosts += 1
            continue
        assert [p["input_ids"].shape[0] for p in parts] == [(rows + 1) // 2, rows // 2]
        for r, part in enumerate(parts):  # rows 0 and 1 of the batch, one to each process (padded to its share)
            width = min(part["input_ids"].shape[1], full["input_ids"].shape[1])
            torch.testing.assert_close(part["input_ids"][0, :width], full["input_ids"][r, :width])
    assert ghosts == 1


@pytest.mark.parametrize("objective,strategy", [("dpo", "ddp"), ("classify", "ddp"), ("dpo", "fsdp"),
                                                ("classify", "fsdp")])
def test_other_objectives_train_on_two_processes_as_on_one(tiny_recipe, tmp_path, objective, strategy):
    from unitune.tasks import orders

    if objective == "dpo":
        data = orders.write_preferences(tmp_path / "pairs", n_train=16, n_val=4)
        files = {"train": str(data / "train.jsonl"), "validation": str(data / "val.jsonl")}
    else:
        (tmp_path / "cls").mkdir()
        for split, n in (("train", 40), ("val", 8)):
            rows = "".join(json.dumps({"text": f"order {i} {'late' if i % 3 else 'fine'} box", "label":
                                       "late" if i % 3 else "fine"}) + "\n" for i in range(n))
            (tmp_path / "cls" / f"{split}.jsonl").write_text(rows)
        files = {"train": str(tmp_path / "cls" / "train.jsonl"), "validation": str(tmp_path / "cls" / "val.jsonl")}
    base = {**tiny_recipe, "objective": {"name": objective}, "data": {**files, "max_length": 128}}
    one = unitune.train(_recipe(base, "one", batch_size=4))
    done = _torchrun(_recipe(base, "two", batch_size=4, distributed=strategy), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = _train_losses(one.dir), _train_losses(one.dir.with_name("two"))
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a), (a, b)
