"""Classification: a head over a model's representation of a text or an image learns the classes of the
training data.

Rows are `text` (+ `text_pair` for sentence-pair tasks), or `image` (a path: an image folder's files, or a
column of a CSV / JSONL), and `label`: a class name or an integer; with `multi_label`, a list of them (or one
string joined by `label_separator`). The classes are the training
data's, sorted (integers in numeric order), unless `objective.labels` lists them; a validation label that
is not one of them is an error naming its row. A text model is loaded as a sequence classifier
(AutoModelForSequenceClassification: BERT pools [CLS], a decoder reads its last token) whose config keeps
the classes as id2label; an image model (models/vision.py) gets a new output layer. The head is new and
trains in full under every method. When nothing but the head trains (method probe), the backbone's features
are computed once, before training, and the head trains on them: no augmentation, no backbone passes.

Single-label: cross-entropy, optionally class-weighted; multi-label: binary cross-entropy per class, a class
predicted when its probability reaches `threshold`. The loss is the model's own head and pooling; one step
normalises by its examples. Held out: loss, accuracy, macro-F1 and the confusion matrix (rows: truth).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from unitune.config import DataConfig, Section
from unitune.data.files import DataError, Row
from unitune.data.images import ImageProcessor
from unitune.data.formats import _str
from unitune.engine.precision import autocast

PACKS = False  # one example per row: the head reads one position (or [CLS]) per row


class Config(Section):
    name: Literal["classify"] = "classify"
    labels: list[str] | None = None  # the classes, in order; default: the training data's, sorted
    multi_label: bool = False  # each row may have several labels (a list, or names joined by label_separator)
    label_separator: str = Field("|", min_length=1)
    # balanced: class c weighs n / (classes x n_c), as scikit-learn's; or one weight per class, in label order
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    threshold: float = Field(0.5, gt=0, lt=1)  # multi-label: the probability at which a class is predicted
    _weights: list[float] | None = PrivateAttr(None)  # class_weights resolved against the label set
    _head: str | None = PrivateAttr(None)  # the head that cached features feed (cache_features)


def kind(recipe) -> str:
    """An image classifier for an image model (or model.kind image-cls), else a sequence classifier."""
    from unitune.models.vision import is_image_model

    image = recipe.model.kind == "image-cls" or is_image_model(recipe.model.name)
    return "image-cls" if image else "seq-cls"


def default_lr(recipe) -> float:
    """A new head over a frozen or adapted encoder needs a high rate (the HF Trainer reaches 0.711 on the
    tweets with LoRA at 2e-3 but only 0.582 at 5e-4); full fine-tuning the usual encoder rate (5e-5), or
    AdamW's usual CNN rate (1e-3) for an image model."""
    if recipe.method.name != "full":
        return 2e-3
    return 1e-3 if kind(recipe) == "image-cls" else 5e-5


@dataclass
class Labelled:
    input_ids: list[int]
    token_type_ids: list[int] | None
    label: Any  # as the row holds it; `labels()` turns it into `target`
    where: str
    truncated: bool
    target: int | list[float] | None = None
    features: torch.Tensor | None = None  # the head's input, where cache_features computed it

    @property
    def length(self) -> int:
        return len(self.input_ids)

    n_loss = 1  # every example carries loss


@dataclass
class Pictured:
    image: torch.Tensor | Path  # uint8 pixels, or the file when they did not fit in memory
    processor: ImageProcessor
    label: Any
    where: str
    target: int | list[float] | None = None
    features: torch.Tensor | None = None

    length, n_loss, truncated = 1, 1, False


def example(row: Row, tok: PreTrainedTokenizerBase | ImageProcessor, data: DataConfig,
            roles: frozenset[str]) -> Labelled | Pictured | None:
    if isinstance(tok, ImageProcessor):
        if row.data.get("label") is None:
            raise DataError(f"{row.where}: no 'label'; image classification rows need 'image' (a path) and 'label'")
        return Pictured(tok.load(row, data.images), tok, row.data["label"], row.where)
    text = _str(row, "text")
    pair = _str(row, "text_pair", required=False) or None if "text_pair" in row.data else None
    if row.data.get("label") is None:
        raise DataError(f"{row.where}: no 'label'; classification rows need 'text' (+ 'text_pair') and 'label'")
    enc = tok(text, pair, add_special_tokens=True)
    truncated = len(enc["input_ids"]) > data.max_length
    if truncated:
        if data.truncation == "drop":
            return None
        enc = tok(text, pair, add_special_tokens=True, truncation=True, max_length=data.max_length)
    return Labelled(enc["input_ids"], enc.get("token_type_ids"), row.data["label"], row.where, truncated)


def _names(ex: Labelled, cfg: Config) -> list[str]:
    """The class names a row's label holds: integers (also 2.0 from a CSV read as floats) become "2"."""
    value = ex.label
    values = value if isinstance(value, list) else \
        value.split(cfg.label_separator) if cfg.multi_label and isinstance(value, str) else [value]
    if not cfg.multi_label and isinstance(value, list):
        raise DataError(f"{ex.where}: 'label' is a list; set objective.multi_label=true for rows with several labels")
    names = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{ex.where}: label {v!r} is not a class name or an integer")
        names.append(str(v).strip())
    if not names and not cfg.multi_label:
        raise DataError(f"{ex.where}: 'label' is empty")
    return names


def labels(train: list[Labelled], val: list[Labelled], cfg: Config) -> list[str]:
    """The classes of the run, in order; sets every example's `target` and the resolved class weights."""
    seen = [_names(e, cfg) for e in train]
    if cfg.labels:
        classes = list(cfg.labels)
    else:
        found = sorted({n for names in seen for n in names})
        numeric = all(n.lstrip("-").isdigit() for n in found)
        classes = sorted(found, key=int) if numeric else found
    if len(classes) < 2 and not cfg.multi_label:
        raise DataError(f"the training data has one class ({classes}): a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    for split, examples, names_of in (("training", train, seen), ("validation", val, [_names(e, cfg) for e in val])):
        for ex, names in zip(examples, names_of):
            if unknown := [n for n in names if n not in index]:
                source = "objective.labels" if cfg.labels else "the training data's labels"
                raise DataError(f"{ex.where}: label '{unknown[0]}' is not one of {source} ({', '.join(classes[:20])}"
                                f"{', ...' if len(classes) > 20 else ''}); fix the row or add the class"
                                f"{' to objective.labels' if cfg.labels else ''} ({split} data)")
            if cfg.multi_label:
                ex.target = [float(c in names) for c in classes]
            else:
                ex.target = index[names[0]]
    cfg._weights = _class_weights(train, classes, cfg)
    return classes


def _class_weights(train: list[Labelled], classes: list[str], cfg: Config) -> list[float] | None:
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != len(classes):
            raise DataError(f"objective.class_weights has {len(cfg.class_weights)} weights for {len(classes)} classes "
                            f"({', '.join(classes)}); give one per class, in that order")
        return list(cfg.class_weights)
    targets = torch.tensor([ex.target for ex in train])
    counts = targets.sum(0) if cfg.multi_label else torch.bincount(targets, minlength=len(classes))
    return (len(train) / (len(classes) * counts.clamp(min=1))).tolist()


def collate(examples: list[Labelled | Pictured], rows: list[list[int]], pad_id: int, packed: bool,
            max_length: int | None = None, train: bool = True) -> dict:
    """Cached features, or images (augmented when `train`), or padded token ids, with their targets."""
    chosen = [examples[i] for row in rows for i in row]
    batch = {"labels": torch.tensor([e.target for e in chosen]), "examples": len(chosen)}
    if chosen[0].features is not None:
        return batch | {"features": torch.stack([e.features for e in chosen])}
    if isinstance(chosen[0], Pictured):
        processor = chosen[0].processor
        pixels = processor.pixels([e.image for e in chosen])
        return batch | {"pixel_values": processor.train(pixels) if train else processor.eval(pixels)}
    ids = [torch.tensor(e.input_ids) for e in chosen]
    batch |= {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
              "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True)}
    if chosen[0].token_type_ids is not None:
        batch["token_type_ids"] = pad_sequence([torch.tensor(e.token_type_ids) for e in chosen], batch_first=True)
    return batch


def count(batch: dict) -> int:
    return batch["examples"]


def logits(model: nn.Module, batch: dict, cfg: Config) -> torch.Tensor:
    if "features" in batch:  # cached: the head alone
        return model.get_submodule(cfg._head)(batch["features"]).float()
    if "pixel_values" in batch:
        return model(batch["pixel_values"]).float()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return model(**inputs).logits.float()


def losses(out: torch.Tensor, target: torch.Tensor, cfg: Config) -> torch.Tensor:
    """One loss per example. Class weights scale each example's loss by its class's weight (multi-label:
    each class's term), and the step divides by its examples: balanced weights average 1 over the data."""
    weight = torch.tensor(cfg._weights, device=out.device) if cfg._weights else None
    if cfg.multi_label:
        return F.binary_cross_entropy_with_logits(out, target.float(), weight=weight, reduction="none").mean(-1)
    return F.cross_entropy(out, target, weight=weight, reduction="none")


def predict(out: torch.Tensor, cfg: Config) -> torch.Tensor:
    return (out.sigmoid() >= cfg.threshold).float() if cfg.multi_label else out.argmax(-1)


def loss(model: nn.Module, batch: dict, cfg: Config, ref=None) -> tuple[torch.Tensor, dict]:
    out = logits(model, batch, cfg)
    right = predict(out.detach(), cfg) == batch["labels"]
    return losses(out, batch["labels"], cfg).sum(), {
        "accuracy": (right.all(-1) if cfg.multi_label else right).float().sum(), "seen_examples": batch["examples"]}


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: true class, columns: predicted). Macro-F1
    averages over the classes that occur in the truth or the predictions, as scikit-learn's f1_score."""
    tp = confusion.diag().double()
    truth, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    present = (truth + predicted) > 0
    f1 = 2 * tp / (truth + predicted).clamp(min=1)
    return {"accuracy": float(tp.sum() / confusion.sum().clamp(min=1)), "macro_f1": float(f1[present].mean())}


def multi_label_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Exact-set accuracy, micro-F1 (over every (row, class) decision) and macro-F1 (over classes)."""
    tp, fp, fn = (pred * target).sum(0), (pred * (1 - target)).sum(0), ((1 - pred) * target).sum(0)
    present = (tp + fp + fn) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return {"accuracy": float((pred == target).all(-1).float().mean()),
            "micro_f1": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


@torch.no_grad()
def evaluate(model: nn.Module, tok: PreTrainedTokenizerBase, val: list[Labelled], recipe, device, amp) -> dict:
    """Loss, accuracy and macro-F1 over the validation examples; `val_confusion` (single-label) is the
    matrix of counts that the report draws."""
    cfg, size = recipe.objective, recipe.eval.batch_size
    was_training = model.training
    model.eval()
    order = sorted(range(len(val)), key=lambda i: val[i].length)  # similar lengths together: little padding
    total, preds, targets = 0.0, [], []
    for start in range(0, len(order), size):
        batch = collate(val, [[i] for i in order[start : start + size]], tok.pad_token_id, False, train=False)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(device, amp):
            out = logits(model, batch, cfg)
        total += float(losses(out, batch["labels"], cfg).sum())
        preds.append(predict(out, cfg).cpu())
        targets.append(batch["labels"].cpu())
    model.train(was_training)
    pred, target = torch.cat(preds), torch.cat(targets)
    metrics = {"loss": total / len(val)}
    if cfg.multi_label:
        metrics.update(multi_label_scores(pred, target))
    else:
        k = out.shape[-1]
        confusion = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        metrics.update(scores(confusion), confusion=confusion.tolist())
    return {f"val_{name}": v for name, v in metrics.items()}


@torch.no_grad()
def cache_features(model: nn.Module, head: str, train: list, val: list, pad_id: int, recipe, device, amp) -> bool:
    """When nothing but the head trains (a linear probe), every example's input to the head, computed once
    with the evaluation transform; the loss then runs the head alone. False, doing nothing, otherwise."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all(n.startswith(head + ".") for n in trainable):
        return False
    cfg, size = recipe.objective, recipe.eval.batch_size
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_pre_hook(lambda m, args: captured.append(args[0].float().cpu()))
    was_training = model.training
    model.eval()
    try:
        for examples in (train, val):
            order = sorted(range(len(examples)), key=lambda i: examples[i].length)
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                batch = collate(examples, [[i] for i in chunk], pad_id, False, train=False)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with autocast(device, amp):
                    logits(model, batch, cfg)
                for i, f in zip(chunk, captured.pop()):
                    examples[i].features = f.clone()
    finally:
        hook.remove()
        model.train(was_training)
    cfg._head = head
    return True
