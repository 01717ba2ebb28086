"""Pick the modules a method wraps, by name pattern or type, for any architecture.

Matching follows PEFT so an adapter_config.json means the same thing to both tools:
a string is a regular expression that must match the whole module name; a list matches a
module whose name equals an entry or ends with '.' + entry; 'all-linear' is every linear
layer except the output projection (the LM head).
"""
from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def output_layer_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def matches(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: str | list[str], extra: tuple[type, ...] = ()) -> list[str]:
    """Names of the linear modules to wrap; an error that lists candidates if none match.

    A layer already wrapped by a method (it has a `base_layer`) counts as the linear layer it
    wraps, so a second adapter lands beside the first; nothing inside a wrapper is a target.
    Modules of the `extra` types (embeddings, convolutions) are targets when named explicitly;
    'all-linear' never includes them, as in PEFT.
    """
    skip = output_layer_names(model)
    wrappers = {n for n, m in model.named_modules() if hasattr(m, "base_layer")}
    inside = lambda n: any(n.startswith(w + ".") for w in wrappers)  # noqa: E731
    linear = [n for n, m in model.named_modules()
              if (n in wrappers or isinstance(m, LINEAR_TYPES)) and n not in skip and not inside(n)]
    others = [n for n, m in model.named_modules() if extra and isinstance(m, extra) and not inside(n)]
    found = linear if targets == "all-linear" else [n for n in linear + others if matches(n, targets)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear + others})
        raise ValueError(
            f"target_modules {targets!r} matches no layer this method can wrap; "
            f"this model's candidates are named: {', '.join(leaves)}" + (" (or use 'all-linear')" if linear else "")
        )
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
