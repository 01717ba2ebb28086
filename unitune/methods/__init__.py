"""Methods: a method is `apply(model, cfg) -> model` that freezes what it does not train.

Each method module exposes `Config` (its recipe fields, with a `name` literal) and `apply`.
Adding a method is one new module and one line in METHODS.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import ModuleType

from unitune.methods import adapter, bitfit, full, ia3, layernorm, lora, partial, prefix, probe, prompt, ptuning, qlora

METHODS: dict[str, ModuleType] = {
    "full": full, "lora": lora, "qlora": qlora, "adapter": adapter, "prefix": prefix, "prompt": prompt,
    "ptuning": ptuning, "ia3": ia3, "bitfit": bitfit, "layernorm": layernorm, "partial": partial, "probe": probe,
}


def method_config(data: dict):
    from unitune.config import plugin_config

    return plugin_config("method", METHODS, data, "lora")


def apply_method(model, cfg, tokenizer=None):
    """Apply the recipe's method; methods that read text (prompt tuning's init_text) get the tokenizer."""
    apply = METHODS[cfg.name].apply
    wants_tokenizer = "tokenizer" in inspect.signature(apply).parameters
    return apply(model, cfg, tokenizer=tokenizer) if wants_tokenizer else apply(model, cfg)


def lr_scale(cfg, lr: float):
    """The method's per-parameter learning-rate multiplier given the recipe's lr, if it has one (LoRA+)."""
    scale = getattr(METHODS[cfg.name], "lr_scale", None)
    return functools.partial(scale, cfg, lr=lr) if scale else None


def packs(cfg) -> bool:
    """False for methods that cannot train on packed rows (virtual tokens)."""
    return getattr(METHODS[cfg.name], "PACKING", True)


def method_footprint(cfg, model) -> str | None:
    """A line on the memory the method saves or adds beyond its trainable parameters, if it has one."""
    footprint = getattr(METHODS[cfg.name], "footprint", None)
    return footprint(model) if footprint else None


def describe() -> dict[str, str]:
    return {name: (mod.__doc__ or "").strip().splitlines()[0] for name, mod in METHODS.items()}


def layer_quantizer(cfg):
    """The method's quantizer for models.load_model, if it stores its base quantized (QLoRA)."""
    quantizer = getattr(METHODS[cfg.name], "layer_quantizer", None)
    return functools.partial(quantizer, cfg) if quantizer else None


def reference(model, cfg, untrained: bool = False) -> Callable[[], AbstractContextManager]:
    """The reference policy for objectives that need one (DPO, KTO): a context manager factory that
    yields the model as it was before training, in eval mode. With a method that can switch its
    adapters off, that is the same model with them off: no second copy in memory (FIELD-NOTES
    trap 6). Otherwise a frozen copy is taken now, before the first step; or, when the caller only
    uses it before that step (`untrained`: references precomputed once), the model itself."""
    disabled = getattr(METHODS[cfg.name], "disabled", None)
    frozen = None if disabled or untrained else copy.deepcopy(model).requires_grad_(False).eval()

    @contextlib.contextmanager
    def ref():
        if frozen is not None:
            yield frozen
            return
        was_training = model.training
        model.eval()
        try:
            with disabled(model) if disabled else contextlib.nullcontext():
                yield model
        finally:
            model.train(was_training)

    return ref
