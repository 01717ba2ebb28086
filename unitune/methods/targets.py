"""Pick the modules a method wraps, by name pattern or type, for any architecture.

Matching follows PEFT so an adapter_config.json means the same thing to both tools:
a string is a regular expression that must match the whole module name; a list matches a
module whose name equals an entry or ends with '.' + entry; 'all-linear' is every linear
layer except the output projection (the LM head). The per-module patterns, the layer filter and
modules_to_save read names as PEFT 0.21 does too (each function names its PEFT counterpart).
"""
from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from unitune.methods.quant import QuantLinear

LINEAR_TYPES = (nn.Linear, Conv1D, QuantLinear)  # QLoRA's base layers are quantized before LoRA wraps them


def output_layer_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def matches(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# The attention projections of the families in use, as PEFT's per-model defaults name them: a method's
# default targets (target_modules unset) are the first group whose every name the model has.
ATTENTION = [
    ["q_proj", "k_proj", "v_proj", "o_proj"],  # Llama, Qwen, Mistral, Gemma, SmolLM, OPT
    ["query", "key", "value", "attention.output.dense"],  # BERT, RoBERTa, MiniLM, ELECTRA
    ["query_proj", "key_proj", "value_proj", "attention.output.dense"],  # DeBERTa-v2/v3
    ["q_lin", "k_lin", "v_lin", "out_lin"],  # DistilBERT
    ["qkv_proj", "o_proj"],  # Phi-3
    ["c_attn", "attn.c_proj"],  # GPT-2
    ["query_key_value", "attention.dense"],  # GPT-NeoX, Falcon
]


def attention_projections(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) or hasattr(m, "base_layer")]
    for group in ATTENTION:
        if all(any(matches(n, [t]) for n in names) for t in group):
            return group
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    raise ValueError(f"{type(model).__name__} is not a family whose attention projections unitune knows: set "
                     f"method.target_modules (its layers are named: {', '.join(leaves)}; or 'all-linear')")


def default_targets(model: nn.Module) -> list[str]:
    """A method's targets when the recipe names none: a transformer family's attention projections; for a
    convolutional network (PEFT has no default for one), its convolutions (ungrouped: a depthwise one is
    already low-rank per channel) and linear layers, each by its full name."""
    try:
        return attention_projections(model)
    except ValueError:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        if not convs:
            raise
        # nn.MultiheadAttention reads its out_proj's weight directly, never calling it: not a layer to wrap
        skip = output_layer_names(model) | {f"{n}.out_proj" for n, m in model.named_modules()
                                            if isinstance(m, nn.MultiheadAttention)}
        return convs + [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]


def find_targets(model: nn.Module, targets: str | list[str], extra: tuple[type, ...] = ()) -> list[str]:
    """Names of the linear modules to wrap; an error that lists candidates if none match.

    A layer already wrapped by a method (it has a `base_layer`) counts as the linear layer it
    wraps, so a second adapter lands beside the first; nothing inside a wrapper is a target.
    Modules of the `extra` types (embeddings, convolutions) are targets when named explicitly;
    'all-linear' never includes them, as in PEFT.
    """
    skip = output_layer_names(model)
    wrappers = {n for n, m in model.named_modules() if hasattr(m, "base_layer")}
    # a module trained in full (modules_to_save) is never also a target, as in PEFT
    copies = {n for n, m in model.named_modules() if hasattr(m, "original_module")}
    inside = lambda n: any(n.startswith(w + ".") for w in wrappers | copies)  # noqa: E731
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


def pattern_value(patterns: dict, name: str, default):
    """The value of the first key (a regex) that matches the end of `name` at a '.' boundary, else
    `default`: PEFT's get_pattern_key, which rank_pattern and alpha_pattern go through."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index PEFT's layers_to_transform reads from a module name: the number after
    `<layers_pattern>.`, or after the second name segment when no pattern is given. The first such
    number, lazily matched, so a MoE expert's index (`layers.1.experts.0.`) is not taken for it."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(found["idx"]) if found else None


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Modules that `modules_to_save` names, outermost only: PEFT wraps every module whose name ends
    with an entry, as a plain suffix (so 'score' is also 'model.score'). An error if none does."""
    wrappers = [n for n, m in model.named_modules() if hasattr(m, "base_layer")]
    found: list[str] = []
    for n, _ in model.named_modules():
        if n and any(n.endswith(k) for k in names) and not any(n.startswith(f + ".") for f in found + wrappers):
            found.append(n)
    if not found:
        top = ", ".join(n for n, _ in model.named_children())
        raise ValueError(f"modules_to_save {names} matches no module of this model; its top-level modules are: {top}")
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
