"""Checkpoints that survive a crash and resume exactly.

`checkpoints/step-N/` holds the trainable weights (safetensors), the optimizer and scheduler
states, every RNG state and the data cursor. It is written to a temporary directory, fsynced and
renamed into place, so a kill mid-save leaves the last good checkpoint untouched; old ones are
renamed aside before they are deleted, so no half-deleted checkpoint keeps a valid name.
`checkpoints/best/` holds the weights of the best evaluation when early stopping watches one.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unitune import atomic
from unitune.engine import distributed

STEP = re.compile(r"step-(\d+)")


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy states, torch generator states as tensors): no pickles on disk."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def running_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that training updates without a gradient: the running statistics of batch norms in train mode
    (a frozen one is a FrozenBatchNorm2d, whose buffers never change)."""
    return {f"{n}.{k}" if n else k: b for n, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for k, b in m.named_buffers(recurse=False)}


def save_weights(weights: dict[str, torch.Tensor], folder: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, folder / "weights.safetensors")


def save(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict, scheduler, trainer: dict,
         keep: int, source: dict[str, torch.Tensor] | None = None) -> Path:
    """`optimizer`: its state dict (whole, gathered from the shards under FSDP); `source`: a batch source's own
    tensors (an online objective's rollout buffer), beside its cursor."""
    final = ckpt_dir / f"step-{step}"
    with atomic.directory(final) as tmp:
        save_weights(weights, tmp)
        if source:
            save_file({k: v.contiguous() for k, v in source.items()}, tmp / "source.safetensors")
        torch.save({"optimizer": optimizer, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        plain, tensors = rng_state()
        save_file(tensors, tmp / "rng.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step, "rng": plain}))
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        atomic.remove_tree(ckpt_dir / f"step-{old}")
    return final


def save_best(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], metrics: dict) -> Path:
    """The trainable weights of the best evaluation so far, and that evaluation."""
    with atomic.directory(ckpt_dir / "best") as tmp:
        save_weights(weights, tmp)
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "metrics": metrics}))
    return ckpt_dir / "best"


def load_weights(path: Path, model: torch.nn.Module) -> None:
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, v in load_file(path / "weights.safetensors").items():
            params[k].copy_(distributed.like(v, params[k]))  # under FSDP: this process's shard


def list_checkpoints(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir()
                  if (m := STEP.fullmatch(p.name)) and (p / "trainer.json").is_file())


def load(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    load_weights(path, model)
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    distributed.shard_optimizer_state(optimizer)
    scheduler.load_state_dict(opt["scheduler"])
    trainer = json.loads((path / "trainer.json").read_text())
    set_rng_state(trainer.pop("rng"), load_file(path / "rng.safetensors"))
    if (path / "source.safetensors").is_file():
        trainer["source_tensors"] = load_file(path / "source.safetensors")
    return trainer
