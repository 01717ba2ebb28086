"""A detection set made by code: coloured shapes (circle, square, triangle) on textured backgrounds, with their
boxes in COCO's format (`train.json` and `val.json`, their images in `images/train/` and `images/val/`).

Each canvas has a random texture (a colour gradient with noise and stripes), then 1-4 shapes of random size,
colour and place, drawn so that they do not overlap by more than a little; a shape's box is its extent.

    unitune.tasks.shapes.write("data/generated/shapes")  ->  train.json, val.json, images/
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from unitune import atomic

CATEGORIES = ["circle", "square", "triangle"]


def _background(rng: random.Random, size: int) -> np.ndarray:
    a, b = np.array([rng.randrange(256) for _ in range(3)]), np.array([rng.randrange(256) for _ in range(3)])
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    img = a * (1 - t) + b * t + np.zeros((size, size, 3))
    period = rng.randint(4, 16)
    stripes = (np.arange(size)[:, None] + np.arange(size)[None, :] * rng.choice([0, 1, -1])) // period % 2
    img += stripes[:, :, None] * rng.randint(-40, 40)
    img += np.random.default_rng(rng.randrange(2**32)).normal(0, 12, img.shape)
    return img.clip(0, 255)


def canvas(rng: random.Random, size: int = 128) -> tuple[np.ndarray, list[tuple[list[float], str]]]:
    """One image (uint8 [size, size, 3]) and its objects: ([x, y, w, h], category)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_background(rng, size).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects: list[tuple[list[float], str]] = []
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(20):
            side = rng.randint(size // 8, size // 3)
            x, y = rng.randint(0, size - side), rng.randint(0, size - side)
            # little overlap with the shapes already drawn: each stays recognisable
            if all(_overlap((x, y, side, side), box) < 0.1 for box, _ in objects):
                break
        else:
            continue
        kind = rng.choice(CATEGORIES)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if kind == "circle":
            draw.ellipse([x, y, x + side - 1, y + side - 1], fill=colour, outline=(0, 0, 0))
        elif kind == "square":
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=colour, outline=(0, 0, 0))
        objects.append(([float(x), float(y), float(side), float(side)], kind))
    return np.asarray(img), objects


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / min(a[2] * a[3], b[2] * b[3])


def write_split(out: Path, split: str, n: int, seed: int, size: int = 128) -> None:
    """`<split>.json` (COCO) and its images in `images/<split>/`; the annotations are written last, so a
    split whose file exists is whole."""
    from PIL import Image

    rng = random.Random(seed)
    images, annotations = [], []
    with atomic.directory(out / "images" / split) as tmp:
        for i in range(n):
            pixels, objects = canvas(rng, size)
            Image.fromarray(pixels).save(tmp / f"{i:05d}.png")
            images.append({"id": i + 1, "file_name": f"images/{split}/{i:05d}.png", "width": size, "height": size})
            for box, kind in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": box,
                                    "category_id": CATEGORIES.index(kind) + 1, "area": box[2] * box[3], "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CATEGORIES)]}
    atomic.write_text(out / f"{split}.json", json.dumps(coco))


def write(out_dir: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 7) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_split(out, "train", n_train, seed)
    write_split(out, "val", n_val, seed + 1)
    return out
