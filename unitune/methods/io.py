"""Save and load a method's trained state in the formats the ecosystem reads.

Methods that PEFT also implements (LoRA, IA3) save as PEFT does: `adapter_config.json` plus
`adapter_model.safetensors` with keys `base_model.model.<module>.<tensor>` (no adapter name),
so `peft.PeftModel.from_pretrained`, transformers and vLLM load them. Such a method module
declares PEFT_TYPE and provides `adapter_state`, `peft_config`, `config_from_peft` and
`merge_and_unload`. Other methods save a plain Hugging Face model directory.

base_model_name_or_path names what PEFT users can load: for a built-in model, the hub id its
weights came from. unitune keeps its own local source (a built-in name or a path) beside it in
`unitune.json`, not in adapter_config.json: PEFT 0.21 loads a config with an extra key but warns,
on every load, that the file comes from a newer PEFT.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unitune.models.builtin import BUILTINS, builtin_name

PEFT_PREFIX = "base_model.model."
# {"base_model": the built-in name or local path unitune loads the base from; a classifier's "labels"}
OWN_FILE = "unitune.json"


def peft_methods() -> dict[str, ModuleType]:
    from unitune.methods import METHODS

    found: dict[str, ModuleType] = {}
    for m in METHODS.values():  # the first module of a type loads it (lora before qlora)
        if hasattr(m, "PEFT_TYPE"):
            found.setdefault(m.PEFT_TYPE, m)
    return found


def is_adapter(cfg) -> bool:
    from unitune.methods import METHODS

    return hasattr(METHODS[cfg.name], "PEFT_TYPE")


def save_adapter(model: nn.Module, out: Path, cfg, base_name: str, info: dict | None = None) -> None:
    """`info`: what else rebuilds the base (an image classifier's architecture, weights, classes and head)."""
    from unitune.methods import METHODS

    method = METHODS[cfg.name]
    out.mkdir(parents=True, exist_ok=True)
    prefix = getattr(method, "KEY_PREFIX", PEFT_PREFIX)  # prompt-learning tables are saved without one
    state = {prefix + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in method.adapter_state(model).items()}
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    builtin = builtin_name(base_name)
    config = {"peft_type": method.PEFT_TYPE, "task_type": task_type(model),
              "base_model_name_or_path": BUILTINS[builtin].hub_id if builtin else base_name,
              "inference_mode": True, "modules_to_save": None, **method.peft_config(cfg, model)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    own = {"base_model": builtin or base_name, **(info or {})}
    if config["task_type"] == "SEQ_CLS":  # the classes, which PEFT's files do not record
        own.update(labels=[model.config.id2label[i] for i in range(model.config.num_labels)],
                   problem_type=model.config.problem_type)
    (out / OWN_FILE).write_text(json.dumps(own, indent=2))


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory was trained on, as unitune loads it: unitune's own record
    first, else PEFT's base_model_name_or_path (an adapter saved by PEFT)."""
    path = Path(path)
    if (path / OWN_FILE).is_file():
        return json.loads((path / OWN_FILE).read_text())["base_model"]
    return json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")


TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForConditionalGeneration": "CAUSAL_LM",
              "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS"}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for this model class; None (a plain PeftModel) for any other module."""
    name = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a PEFT-format adapter directory (written by unitune or by PEFT) to a base model."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} holds no adapter_config.json: not an adapter directory")
    raw = json.loads((path / "adapter_config.json").read_text())
    methods = peft_methods()
    kind = raw.get("peft_type", "LORA")
    if kind not in methods:
        raise ValueError(f"{path}: adapter type {kind} is not one unitune loads ({', '.join(methods)})")
    method = methods[kind]
    if raw.get("modules_to_save") and "modules_to_save" not in method.Config.model_fields:
        raise ValueError(f"{path}: adapter_config.json sets 'modules_to_save', which unitune loads for LoRA only")
    model = method.apply(model, method.config_from_peft(raw, path))
    if (path / "adapter_model.safetensors").is_file():
        saved = load_file(path / "adapter_model.safetensors")
    else:
        saved = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    # PEFT may keep the adapter name in keys (`lora_A.default.weight`); accept both forms.
    saved = {re.sub(r"\.default(?=\.|$)", "", k.removeprefix(PEFT_PREFIX)): v for k, v in saved.items()}
    expected = method.adapter_state(model)
    # PEFT also saves whole embedding layers when LoRA targets them (the vocabulary may have grown):
    # those are base weights of this model and load as such.
    params = dict(model.named_parameters())
    expected.update({k: params[k] for k in saved if k not in expected and k.endswith(".base_layer.weight") and k in params})
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter does not fit this base model: {len(missing)} missing tensors "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(saved[k].to(t.dtype))
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter in the model into its base weights."""
    from unitune.methods import METHODS

    for method in {m for m in METHODS.values() if hasattr(m, "merge_and_unload")}:
        model = method.merge_and_unload(model)
    return model
