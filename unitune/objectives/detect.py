"""Object detection: a detector (models/detection.py) learns the boxes and categories of a COCO annotations file.

Rows come from the file (data/coco.py), one per image; the categories are the training file's, in id order,
unless `objective.labels` lists them; a held-out box of another category is an error naming its annotation.
Each image is decoded once, its shorter side at data.image_size, its boxes scaled with it and checked against
its real size. Training augmentation: a horizontal flip (`flip` in data.augment) of image and boxes together.

The loss is the detector's own (Faster R-CNN: RPN objectness and box regression, then the box head's
classification and regression; RetinaNet: focal loss; FCOS: focal, GIoU and centerness), a mean over the
batch's images, so one step normalises by its images. Held out: COCO mAP@[.5:.95], mAP@0.5, mAP@0.75 and
mAR@100 (torchmetrics with pycocotools), and the report draws predictions on held-out images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from unitune.config import DataConfig, Section
from unitune.data.coco import EDGE
from unitune.data.files import DataError, Row
from unitune.data.images import ImageProcessor, file_size, image_path, resized
from unitune.engine.precision import autocast

KIND = "detection"
PACKS = False


class Config(Section):
    name: Literal["detect"] = "detect"
    labels: list[str] | None = None  # the categories, in order; default: the training file's, by id
    draw: int = Field(6, ge=0)  # held-out images drawn with their predictions in the report
    draw_threshold: float = Field(0.5, gt=0, lt=1)  # the score from which a prediction is drawn


def default_lr(recipe) -> float:
    """AdamW's usual rates for detectors: 1e-4 for every weight, 1e-3 when most are frozen or adapted."""
    return 1e-4 if recipe.method.name == "full" else 1e-3


@dataclass
class Boxed:
    image: torch.Tensor | Path  # uint8 pixels, or the file when they did not fit in memory
    processor: ImageProcessor
    boxes: torch.Tensor  # [n, 4] x1 y1 x2 y2, in the decoded image's pixels
    names: list[str]
    ids: list  # the boxes' annotation ids
    categories: list[str]  # every category of the file, by id
    where: str
    target: torch.Tensor | None = None  # category indices + 1 (0 is the background)
    features = None

    length, n_loss, truncated = 1, 1, False


def example(row: Row, tok: ImageProcessor, data: DataConfig, roles: frozenset[str]) -> Boxed:
    if "boxes" not in row.data:
        raise DataError(f"{row.where}: not a detection row; objective.name=detect reads a COCO annotations file "
                        "(data.train: annotations.json)")
    path = image_path(row, data.images)
    width, height = file_size(path, row.where)
    for box, ann in zip(row.data["boxes"], row.data["annotation_ids"]):
        if box[2] > width + EDGE or box[3] > height + EDGE:
            raise DataError(f"{row.where}: annotation id {ann}: box {box} (x1, y1, x2, y2) lies outside the image, "
                            f"which is {width}x{height}")
    pixels = tok.load(row, data.images)
    w, h = resized(width, height, tok.size)
    boxes = torch.tensor(row.data["boxes"], dtype=torch.float32).reshape(-1, 4)
    boxes = (boxes * torch.tensor([w / width, h / height, w / width, h / height])).clamp(min=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h)
    return Boxed(pixels, tok, boxes, list(row.data["labels"]), list(row.data["annotation_ids"]),
                 row.data["categories"], row.where)


def labels(train: list[Boxed], val: list[Boxed], cfg: Config) -> list[str]:
    """The categories, in order; sets every example's `target`."""
    classes = list(cfg.labels or train[0].categories)
    index = {c: i + 1 for i, c in enumerate(classes)}
    for split, examples in (("training", train), ("validation", val)):
        for ex in examples:
            for name, ann in zip(ex.names, ex.ids):
                if name not in index:
                    raise DataError(f"{ex.where}: annotation id {ann}: category '{name}' is not one of "
                                    f"{'objective.labels' if cfg.labels else 'the training file'}'s ({', '.join(classes)}) "
                                    f"({split} data)")
            ex.target = torch.tensor([index[n] for n in ex.names], dtype=torch.int64)
    return classes


def collate(examples: list[Boxed], rows: list[list[int]], pad_id: int, packed: bool, max_length: int | None = None,
            train: bool = True) -> dict:
    """Images as floats in [0, 1] (the detector normalises them) and their targets; flipped when training."""
    chosen = [examples[i] for row in rows for i in row]
    images, targets = [], []
    for e in chosen:
        image, boxes = e.processor.decoded(e.image).float() / 255, e.boxes.clone()
        if train and "flip" in e.processor.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes[:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
        images.append(image)
        targets.append({"boxes": boxes, "labels": e.target})
    return {"images": images, "targets": targets, "examples": len(chosen)}


def count(batch: dict) -> int:
    return batch["examples"]


def _on(device, batch: dict) -> tuple[list[torch.Tensor], list[dict]]:
    return ([im.to(device) for im in batch["images"]],
            [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]])


def loss(model: nn.Module, batch: dict, cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    images, targets = _on(next(model.parameters()).device, batch)
    parts = model(images, targets)  # the detector's losses, each a mean over the batch's images
    n = batch["examples"]
    return sum(parts.values()) * n, {**{k: v.detach() * n for k, v in parts.items()}, "seen_images": n}


@torch.no_grad()
def predict(model: nn.Module, examples: list[Boxed], size: int, device, amp) -> list[dict]:
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(examples), size):
        batch = collate(examples, [[i] for i in range(start, min(start + size, len(examples)))], 0, False, train=False)
        with autocast(device, amp):
            preds = model(_on(device, batch)[0])
        out += [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in p.items()} for p in preds]
    model.train(was_training)
    return out


def evaluate(model: nn.Module, tok, val: list[Boxed], recipe, device, amp) -> dict:
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError:
        raise ImportError("detection's mAP is computed by torchmetrics: pip install torchmetrics pycocotools") from None
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    preds = predict(model, val, recipe.eval.batch_size, device, amp)
    metric.update(preds, [{"boxes": e.boxes, "labels": e.target} for e in val])
    r = metric.compute()
    return {"val_map": float(r["map"]), "val_map_50": float(r["map_50"]), "val_map_75": float(r["map_75"]),
            "val_mar_100": float(r["mar_100"])}


def figures(loaded, val: list[Boxed], recipe, run_dir: Path, device, amp) -> None:
    """predictions.png: the first held-out images with their predicted boxes (score >= draw_threshold) and
    the true ones."""
    from unitune.eval.report import plot_detections

    cfg = recipe.objective
    shown = val[: cfg.draw]
    if not shown:
        return
    preds = predict(loaded.model, shown, recipe.eval.batch_size, device, amp)
    names = loaded.info["labels"]
    plot_detections([e.processor.decoded(e.image) for e in shown], [
        [(b.tolist(), names[int(c) - 1], float(s)) for b, c, s in zip(p["boxes"], p["labels"], p["scores"])
         if s >= cfg.draw_threshold] for p in preds],
        [[(b.tolist(), names[int(c) - 1]) for b, c in zip(e.boxes, e.target)] for e in shown],
        run_dir / "predictions.png")
