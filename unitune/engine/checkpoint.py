"""Checkpoints that survive a crash and resume exactly.

`checkpoints/step-N/` holds the trainable weights (safetensors), the optimizer and scheduler
states, every RNG state and the data cursor. It is written to a temporary directory and renamed
into place, so a crash mid-save leaves the last good checkpoint untouched.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


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


def save(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer, scheduler, trainer: dict, keep: int) -> Path:
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    plain, tensors = rng_state()
    save_file(tensors, tmp / "rng.safetensors")
    (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step, "rng": plain}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(list_checkpoints(ckpt_dir))[:-keep]:
        shutil.rmtree(ckpt_dir / f"step-{old}")
    return final


def list_checkpoints(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("step-*") if (p / "trainer.json").is_file())


def load(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    weights = load_file(path / "weights.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    trainer = json.loads((path / "trainer.json").read_text())
    set_rng_state(trainer.pop("rng"), load_file(path / "rng.safetensors"))
    return trainer
