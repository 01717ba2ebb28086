"""COCO detection annotations as rows: one per image, with its boxes and their category names.

    {"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id", "image_id", "bbox": [x, y, w, h],
     "category_id", "iscrowd"}], "categories": [{"id", "name"}]}

A row is {"image": file_name, "boxes": [[x1, y1, x2, y2], ...], "labels": [name, ...], "annotation_ids": [...],
"categories": [every category name, by id]}. An annotation that names an image or category the file does not
have, or a box of non-positive size or outside its image's declared size, is an error naming the annotation
id; crowd annotations (iscrowd=1) are left out, as torchvision's COCO recipes leave them out of training.
"""
from __future__ import annotations

from collections import Counter
from numbers import Real
from pathlib import Path

from unitune.data.files import DataError, Row

EDGE = 1.0  # pixels a box may overrun its image by (annotation tools round outwards)


def is_coco(doc) -> bool:
    return isinstance(doc, dict) and {"images", "annotations"} <= doc.keys()


def rows(doc: dict, path: Path) -> list[Row]:
    cats = doc.get("categories") or []
    if not cats or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise DataError(f"{path}: a COCO file needs 'categories', a list of {{\"id\", \"name\"}}")
    names = {c["id"]: str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])}
    if twice := sorted(n for n, k in Counter(names.values()).items() if k > 1):
        raise DataError(f"{path}: categories {twice} each appear under more than one id; give each category one id")
    images: dict = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        if im["id"] in images:
            raise DataError(f"{path}: image id {im['id']} appears twice in 'images'")
        images[im["id"]] = {"image": im["file_name"], "width": im.get("width"), "height": im.get("height"),
                            "boxes": [], "labels": [], "annotation_ids": [], "categories": list(names.values())}
    for i, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotation id {ann.get('id', f'#{i}')}" if isinstance(ann, dict) else f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or not {"image_id", "bbox", "category_id"} <= ann.keys():
            raise DataError(f"{where}: needs 'image_id', 'bbox' and 'category_id'")
        if ann.get("iscrowd"):
            continue
        if ann["image_id"] not in images:
            raise DataError(f"{where}: image_id {ann['image_id']} is not in the file's images")
        if ann["category_id"] not in names:
            raise DataError(f"{where}: category_id {ann['category_id']} is not one of the categories "
                            f"({', '.join(f'{k}={v}' for k, v in names.items())})")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, Real) and not isinstance(v, bool) for v in box)):
            raise DataError(f"{where}: bbox {box!r} is not [x, y, width, height]")
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: bbox {box} has a non-positive width or height")
        image = images[ann["image_id"]]
        width, height = image["width"], image["height"]
        if x < -EDGE or y < -EDGE or (width and x + w > width + EDGE) or (height and y + h > height + EDGE):
            raise DataError(f"{where}: bbox {box} lies outside its image {image['image']} ({width}x{height})")
        image["boxes"].append([x, y, x + w, y + h])
        image["labels"].append(names[ann["category_id"]])
        image["annotation_ids"].append(ann.get("id", f"#{i}"))
    return [Row(data, f"{path}: image id {image_id} ({data['image']})") for image_id, data in images.items()]
