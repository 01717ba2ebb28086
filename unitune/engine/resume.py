"""What a resumed run must share with the run it continues: the recipe's trajectory and the data.

`--resume` promises the weights an uninterrupted run would reach. A change to anything that
steers the trajectory (learning rate, steps, seed, method, data, ...) breaks that promise
silently, so it is refused unless the user says `--force`; a data file whose content changed
since the run started is refused the same way.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from unitune import atomic
from unitune.config import Recipe, RecipeError

# Keys a resumed run may change: they decide what is logged, saved or shown, not the weights.
# (Evaluation runs in eval mode under no_grad and greedy decoding draws no random numbers.)
HARMLESS = {"train.log_every", "train.save_every", "train.keep_checkpoints", "train.eval_every",
            "eval.before", "eval.generate", "eval.max_new_tokens", "eval.batch_size", "output.overwrite",
            "data.cache", "data.num_proc", "train.distributed"}  # DDP and FSDP compute the same steps
FINGERPRINT = "data-fingerprint.json"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def changed_keys(old: Recipe, new: Recipe) -> dict[str, tuple]:
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in HARMLESS and not k.startswith("output.")}


def check_recipe(old: Recipe, new: Recipe, force: bool) -> None:
    changed = changed_keys(old, new)
    if changed and not force:
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
        raise RecipeError(f"--resume would continue on a different trajectory than the run started ({what}): "
                          "undo the change, or add --force to resume anyway (the result will not equal an "
                          "uninterrupted run)")


def file_digest(path: Path) -> str:
    """sha256 of a file's content (a directory's: its files' names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def data_fingerprint(recipe: Recipe) -> dict[str, str]:
    files = {k: getattr(recipe.data, k) for k in ("train", "validation")}
    return {k: file_digest(Path(v).expanduser()) for k, v in files.items() if v and Path(v).expanduser().exists()}


def record_data(run_dir: Path, recipe: Recipe) -> None:
    atomic.write_text(run_dir / FINGERPRINT, json.dumps(data_fingerprint(recipe), indent=2))


def check_data(run_dir: Path, recipe: Recipe, force: bool) -> None:
    path = run_dir / FINGERPRINT
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()), data_fingerprint(recipe)
    changed = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
    if changed and not force:
        names = ", ".join(f"data.{k} ({getattr(recipe.data, k)})" for k in sorted(changed))
        raise RecipeError(f"--resume: the content of {names} changed since the run started, so the data plan "
                          "would not match the checkpoint's cursor: restore the file, or add --force")
