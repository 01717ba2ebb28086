"""Save and load a method's trained state in the formats the ecosystem reads.

LoRA adapters are written as PEFT writes them: `adapter_config.json` plus
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` (no adapter name),
so `peft.PeftModel.from_pretrained`, transformers and vLLM load them. Full fine-tunes are a plain
Hugging Face model directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unitune.methods import lora

PEFT_PREFIX = "base_model.model."


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    state = {}
    for name, layer in lora.lora_layers(model):
        if adapter in layer.lora_A:
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter].weight
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter].weight
    return state


def peft_config(cfg: lora.Config, model: nn.Module, base_name: str, targets: list[str]) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        # Leaf names, as a list: PEFT and vLLM both read that form.
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}),
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in lora.lora_layers(model)),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def save_adapter(model: nn.Module, out: Path, cfg: lora.Config, base_name: str, adapter: str = "default") -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state(model, adapter).items()}
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    targets = [n for n, m in lora.lora_layers(model) if adapter in m.lora_A]
    (out / "adapter_config.json").write_text(json.dumps(peft_config(cfg, model, base_name, targets), indent=2))


def read_adapter_config(path: Path) -> lora.Config:
    raw = json.loads((path / "adapter_config.json").read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: adapter type {raw.get('peft_type')} is not LoRA; unitune loads LoRA adapters")
    for unsupported in ("use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if raw.get(unsupported):
            raise ValueError(f"{path}: adapter_config.json sets '{unsupported}', which unitune cannot load yet")
    return lora.Config(
        r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw["target_modules"], rslora=raw.get("use_rslora", False),
    )


def load_adapter(model: nn.Module, path: str | Path, adapter: str = "default") -> nn.Module:
    """Apply a PEFT-format LoRA adapter directory (ours or PEFT's) to a base model."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} holds no adapter_config.json: not a LoRA adapter directory")
    model = lora.apply(model, read_adapter_config(path), adapter)
    if (path / "adapter_model.safetensors").is_file():
        saved = load_file(path / "adapter_model.safetensors")
    else:
        saved = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    expected = adapter_state(model, adapter)
    # PEFT may write the adapter name into keys (`lora_A.default.weight`); accept both forms.
    saved = {k.replace(f".{adapter}.weight", ".weight"): v for k, v in saved.items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: adapter does not fit this base model: {len(missing)} missing tensors "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(saved[k].to(t.dtype))
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold of the model: the parameters that train."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
