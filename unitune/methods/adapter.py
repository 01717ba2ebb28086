"""Bottleneck adapters: a small down-project / non-linearity / up-project block in each layer.

Houlsby et al. (2019) put one after the attention output and one after the feed-forward output
(sequential: h + up(f(down(h)))); Pfeiffer et al. (2021) keep only the one after the
feed-forward block; the parallel form (He et al., 2022) runs beside the feed-forward block on
its input: mlp(x) + s·up(f(down(x))). The up projection starts at zero, so training starts at
the base model. The places are found by name for Llama/Qwen/Gemma/Mistral, GPT-2, GPT-NeoX, OPT,
BERT/MiniLM, DistilBERT and ModernBERT, or given as `attn_modules` / `mlp_modules`. In a convolutional
network an adapter follows every block (methods/selective.py `blocks`), acting on each pixel's channels.

PEFT has no bottleneck adapters, so the saved adapter is unitune's own (peft_type BOTTLENECK,
same two files). A non-linear adapter cannot be folded into the base weights.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from unitune.config import Section
from unitune.methods import lora
from unitune.methods.selective import blocks
from unitune.methods.targets import matches, set_module

PEFT_TYPE = "BOTTLENECK"

# Output projections of the attention and feed-forward sublayers, and whole feed-forward blocks.
ATTN_OUT = r".*\.(self_attn\.o_proj|attn\.c_proj|attention\.output\.dense|(self_attn|attn)\.out_proj|attention\.dense|attention\.out_lin|attn\.Wo)"
MLP_OUT = r".*\.(mlp\.down_proj|mlp\.c_proj|layer\.\d+\.output\.dense|mlp\.dense_4h_to_h|fc2|ffn\.lin2|mlp\.Wo)"
MLP = r".*\.(layers|h|layer|blocks)\.\d+\.(mlp|feed_forward|ffn)"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Config(Section):
    name: Literal["adapter"] = "adapter"
    variant: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: int = Field(16, gt=0)  # bottleneck width = hidden size / reduction_factor
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = 1.0  # multiplies the adapter's output (the parallel paper uses 4)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attn_modules: str | list[str] | None = None  # where to place the attention adapters (houlsby); default: by name
    modules_to_save: list[str] | None = None  # modules trained in full beside the adapters (a new task head)
    mlp_modules: str | list[str] | None = None  # feed-forward output projections, or blocks (parallel)


class Bottleneck(nn.Module):
    def __init__(self, dim: int, cfg: Config, device=None):
        super().__init__()
        width = max(1, dim // cfg.reduction_factor)
        self.down = nn.Linear(dim, width, device=device)
        self.act = ACTIVATIONS[cfg.non_linearity]()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.up = nn.Linear(width, dim, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scaling = cfg.scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.dropout(h).to(self.down.weight.dtype)
        if h.dim() == 4:  # a CNN's feature map [n, channels, height, width]: the same bottleneck on each pixel
            return (self.up(self.act(self.down(x.movedim(1, -1)))) * self.scaling).movedim(-1, 1).to(h.dtype)
        return (self.up(self.act(self.down(x))) * self.scaling).to(h.dtype)


class AdapterLayer(nn.Module):
    """A frozen sublayer with a bottleneck after it (sequential) or beside it (parallel)."""

    def __init__(self, base: nn.Module, dim: int, cfg: Config, parallel: bool):
        super().__init__()
        device = next(base.parameters()).device
        self.base_layer, self.adapter, self.parallel = base, Bottleneck(dim, cfg, device), parallel

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.adapter(x if self.parallel else h)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _output_dim(module: nn.Module) -> int:
    if hasattr(module, "out_features"):
        return module.out_features
    if hasattr(module, "nf"):  # GPT-2's Conv1D
        return module.nf
    if norms := [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]:  # a CNN block: its output channels
        return norms[-1].num_features
    if hasattr(module, "weight"):
        return module.weight.shape[0]
    raise ValueError(f"cannot tell the output width of {type(module).__name__}")


def _input_dim(block: nn.Module) -> int:
    first = next(m for m in block.modules() if isinstance(m, nn.Linear) or hasattr(m, "nf"))
    return first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]


def _is_cnn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules()) and not any(
        matches(n, MLP_OUT) for n, _ in model.named_modules())


def _find(model: nn.Module, pattern: str | list[str], what: str) -> list[str]:
    found = [n for n, _ in model.named_modules() if matches(n, pattern)]
    if not found:
        raise ValueError(f"found no {what} in {type(model).__name__} (looked for {pattern!r}); "
                         f"name them with method.{'attn' if 'attention' in what else 'mlp'}_modules")
    return found


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    model.requires_grad_(False)
    lora.add_modules_to_save(model, cfg.modules_to_save)
    if cfg.variant == "parallel":
        where = {n: True for n in _find(model, cfg.mlp_modules or MLP, "feed-forward block (mlp/ffn) "
                                        "for a parallel adapter; BERT-style layers split theirs in two, use houlsby or pfeiffer")}
    elif cfg.mlp_modules is None and _is_cnn(model):  # after every block (Conv-Adapter, Chen et al. 2022)
        where = {n: False for n in blocks(model)}
    else:
        where = {n: False for n in _find(model, cfg.mlp_modules or MLP_OUT, "feed-forward output projection")}
        if cfg.variant == "houlsby":
            where.update({n: False for n in _find(model, cfg.attn_modules or ATTN_OUT, "attention output projection")})
    for name, parallel in where.items():
        base = model.get_submodule(name)
        dim = _input_dim(base) if parallel else _output_dim(base)
        set_module(model, name, AdapterLayer(base, dim, cfg, parallel))
    return model


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.adapter.{k}": t for n, m in adapter_layers(model) for k, t in m.adapter.state_dict().items()} \
        | lora.saved_state(model)


def peft_config(cfg: Config, model: nn.Module) -> dict:
    """The recipe fields, with the places resolved to module names so a load puts them back exactly."""
    names = [n for n, _ in adapter_layers(model)]
    attn = [n for n in names if cfg.variant == "houlsby" and matches(n, cfg.attn_modules or ATTN_OUT)]
    return cfg.model_dump(exclude={"name"}) | {"attn_modules": attn or None, "mlp_modules": [n for n in names if n not in attn]}


def config_from_peft(raw: dict, where) -> Config:
    return Config(**{k: raw[k] for k in Config.model_fields if k in raw and k != "name"})


def merge_and_unload(model: nn.Module) -> nn.Module:
    if adapter_layers(model):
        raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights; "
                         "load the run directory itself (unitune generate/chat/eval RUN)")
    return model
