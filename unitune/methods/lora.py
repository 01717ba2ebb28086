"""LoRA: a trainable low-rank update B·A beside each frozen target layer (Hu et al., 2021).

y = W x + (alpha / r) · B A dropout(x), with A Kaiming-uniform and B zero so training starts
at the base model. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead, which keeps
the update's size stable as the rank grows. DoRA (Liu et al., 2024) learns each output row's
magnitude m apart from its direction: W' = m ⊙ (W + s·B A) / ||W + s·B A||, the norm taken
per row and treated as a constant in backward (the paper's section 4.3, as PEFT does).
PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) start A and B from the top-r SVD or the
QR factors of W and train on the residual W - s·B A, so step 0 is still the base model. Layout
and init follow PEFT's LoraLayer, so an adapter moves between the two tools with the same numbers.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from unitune.config import Section
from unitune.methods.quant import QuantEmbedding, dequantize_model
from unitune.methods.targets import (default_targets, find_modules_to_save, find_targets, layer_index, matches,
                                     pattern_value, set_module)

PEFT_TYPE = "LORA"


class Config(Section):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # None: the family's attention projections (q/k/v/o_proj in Llama, query/key/value/... in BERT)
    target_modules: str | list[str] | None = None
    rslora: bool = False
    loraplus_lr_ratio: float | None = Field(None, gt=0)  # LoRA+: B (and 1-D params) learn this much faster
    loraplus_lr_embedding: float = Field(1e-6, gt=0)  # LoRA+: the lr of adapters on embedding layers (PEFT's)
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row
    # kaiming: A random, B zero. pissa / olora: principal directions of W (the saved adapter is
    # converted to a plain rank-2r LoRA of the original base, as PEFT's weight conversion does).
    init: Literal["kaiming", "pissa", "olora"] = "kaiming"
    # PEFT's per-module rank and alpha: {regex: value}; the first key that matches the end of a
    # module's name at a '.' boundary wins ("q_proj", "layers\.0\.mlp\..*"); r and alpha elsewhere.
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = {}
    alpha_pattern: dict[str, float] = {}
    # PEFT's layer filter for a list of target_modules: only blocks whose index (the number after
    # `layers_pattern.`, e.g. "layers") is listed. A saved adapter names the chosen modules instead.
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None  # matched as target_modules is
    # Modules trained in full beside LoRA (a classification head): a trainable copy per adapter,
    # saved whole under PEFT's modules_to_save. Names match as a suffix of the module name, as in PEFT.
    modules_to_save: list[str] | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _regex_keys(cls, patterns: dict) -> dict:
        for key in patterns:
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"key {key!r} is not a regular expression ({err})") from None
        return patterns

    @model_validator(mode="after")
    def _layer_filter_as_peft(self):
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("layers_to_transform needs target_modules as a list of names (as in PEFT); "
                             "with a regex, write the layers into the regex")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only says where layers_to_transform reads the index: set layers_to_transform")
        return self


def lr_scale(cfg: Config, name: str, param: torch.Tensor, lr: float) -> float:
    """LoRA+ (Hayou et al., 2024): B gets a larger learning rate than A, and adapters on embedding
    layers a fixed small one; grouping as in PEFT's create_loraplus_optimizer."""
    if not cfg.loraplus_lr_ratio:
        return 1.0
    if "lora_embedding_" in name:
        return cfg.loraplus_lr_embedding / lr
    return cfg.loraplus_lr_ratio if "lora_B" in name or param.ndim == 1 else 1.0


def scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class _MergedLoRA(torch.autograd.Function):
    """y = x (W + s·B·A)^T + b in one matmul, with hand-written gradients for A and B only.

    The textbook form W x + s·B(A x) adds two elementwise passes over the (tokens x out) output
    in forward and backward; on a CPU that is ~30% on top of the frozen matmul. Merging the
    rank-r update into the weight costs out·in·r flops, and the gradients of A and B go through
    the thin (tokens x r) products, never through the full weight gradient (Unsloth's trick).
    Exact in real arithmetic; used without dropout and outside autocast, and only for inputs of
    more tokens than in·out/(in+out): below that (decoding, a few tokens a step) rebuilding the
    weight costs more than the two thin matmuls it saves (FIELD-NOTES trap 12).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale = scale
        return F.linear(x, torch.addmm(weight, b, a, alpha=scale), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b = ctx.saved_tensors
        s = ctx.scale
        g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad @ torch.addmm(weight, b, a, alpha=s) if ctx.needs_input_grad[0] else None
        grad_a = (g @ b).T.mm(x2).mul_(s)
        grad_b = g.T.mm(x2 @ a.T).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) with named LoRA adapters beside it."""

    def state(self, adapter: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's names, relative to the layer.

        A PiSSA/OLoRA adapter was trained against the residual base; W + s(BA - B0 A0) is the
        same model on the original base, i.e. the rank-2r LoRA [A; A0], [B, -B0].
        """
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if adapter in self.lora_init:
            a0, b0 = self.lora_init[adapter]
            a, b = torch.cat([a, a0]), torch.cat([b, -b0], dim=1)
        out = {"lora_A.weight": a, "lora_B.weight": b}
        if adapter in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[adapter]
        return out

    def __init__(self, base: nn.Module, adapter: str, r: int, alpha: float, dropout: float, rslora: bool,
                 dora: bool = False, init: str = "kaiming"):
        super().__init__()
        self.base_layer = base
        # Conv1D stores its weight as (in, out): the transpose of nn.Linear's (a quantized Conv1D keeps its layout).
        self.fan_in_fan_out = isinstance(base, Conv1D) or getattr(base, "fan_in_fan_out", False)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:  # nn.Linear, or a quantized linear layer (whose weight is computed on demand)
            self.in_features, self.out_features = base.in_features, base.out_features
        self._new_stores()
        self.add_adapter(adapter, r, alpha, dropout, rslora, dora, init)

    def _new_stores(self) -> None:
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.lora_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA starting A, B
        self.active: str | None = None
        self.merged = False

    def stores(self) -> tuple:
        return self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector

    def add_adapter(self, adapter: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool = False,
                    init: str = "kaiming") -> None:
        device = self.base_layer.weight.device
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter] = scaling(alpha, r, rslora)
        nn.init.kaiming_uniform_(self.lora_A[adapter].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter].weight)
        if init != "kaiming":
            self._principal_init(adapter, r, init)
        if dora:  # the magnitude starts as the rows' norms of the weight the layer computes with
            self.lora_magnitude_vector[adapter] = nn.Parameter(self.dora_norm(adapter).float())
        self.active = adapter

    @torch.no_grad()
    def _principal_init(self, adapter: str, r: int, init: str) -> None:
        """PiSSA: A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s). OLoRA: W = QR, A = R_r, B = Q_r.
        Either way the base keeps W - s·B A, so the layer's output is unchanged."""
        w = self.base_layer.weight
        full = self.linear_weight().float()
        if min(full.shape) < r:
            raise ValueError(f"{init} init needs r <= {min(full.shape)} (the weight's smaller side), got r={r}")
        s = self.scaling[adapter]
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(full, full_matrices=False)
            root = (sv[:r] / s).sqrt()
            a, b = root[:, None] * vh[:r], u[:, :r] * root
        else:
            q, rr = torch.linalg.qr(full)
            a, b = rr[:r], q[:, :r]
        self.lora_A[adapter].weight.copy_(a.contiguous())
        self.lora_B[adapter].weight.copy_(b.contiguous())
        residual = full - s * b @ a
        w.copy_((residual.T if self.fan_in_fan_out else residual).to(w.dtype))
        self.lora_init[adapter] = (a.clone(), b.clone())

    def merges_for(self, x: torch.Tensor) -> bool:
        """Whether folding B·A into W first is cheaper for this input: out·in·r flops to fold, against
        tokens·r·(in+out) for the low-rank path, whatever the rank."""
        w = self.base_layer.weight
        return x.numel() // x.shape[-1] * (w.shape[0] + w.shape[1]) > w.shape[0] * w.shape[1]

    def linear_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def dora_norm(self, adapter: str) -> torch.Tensor:
        """||W + s·B A|| per output row, as a constant (no gradient flows through it). Kept until A, B or
        W change (their tensor versions), so decoding does not rebuild the full weight at every token."""
        a, b, w = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.base_layer.weight
        key = (a._version, b._version, w._version, a.data_ptr(), b.data_ptr(), w.data_ptr())
        cached = self.__dict__.setdefault("_norms", {}).get(adapter)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            w = self.linear_weight()
            lora_w = self.lora_B[adapter].weight @ self.lora_A[adapter].weight
            norm = torch.linalg.norm(w + self.scaling[adapter] * lora_w.to(w.dtype), dim=1)
        self._norms[adapter] = (key, norm)
        return norm

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """The update B·A·scale in the base weight's layout."""
        delta = self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]
        return delta.T if self.fan_in_fan_out else delta

    def _dora_factor(self, adapter: str) -> torch.Tensor:
        """m / ||W + s·B A||, shaped to scale the rows of the base weight's own layout."""
        f = (self.lora_magnitude_vector[adapter] / self.dora_norm(adapter)).detach()
        return f[None, :] if self.fan_in_fan_out else f[:, None]

    def merge(self) -> None:
        if self.active is None or self.merged:
            return
        if getattr(self.base_layer, "quantized", False):
            raise RuntimeError("a quantized base cannot take a merged adapter: use merge_and_unload, which "
                               "dequantizes it first, or merge the saved adapter into the original model")
        w, a = self.base_layer.weight, self.active
        with torch.no_grad():
            if a in self.lora_magnitude_vector:
                self._merged_factor = self._dora_factor(a).to(w.dtype)
                w.add_(self.delta_weight(a).to(w.dtype)).mul_(self._merged_factor)
            else:
                w.add_(self.delta_weight(a).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        w, a = self.base_layer.weight, self.active
        with torch.no_grad():
            if a in self.lora_magnitude_vector:
                w.div_(self._merged_factor)
            w.sub_(self.delta_weight(a).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None or self.merged:
            return self.base_layer(x)
        folded = self.__dict__.get("_folded")  # set by for_generation: W + s·B·A, built once for a rollout
        if folded is not None:
            return F.linear(x, folded, self.base_layer.bias)
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        dropout = self.lora_dropout[self.active]
        no_dropout = isinstance(dropout, nn.Identity) or not self.training
        if self.active in self.lora_magnitude_vector:
            return self._dora_forward(x, a, b, dropout, no_dropout)
        if (no_dropout and not getattr(self.base_layer, "quantized", False)
                and self.base_layer.weight.dtype == x.dtype == a.weight.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            s = self.scaling[self.active]
            if self.merges_for(x):
                return _MergedLoRA.apply(x, self.linear_weight(), self.base_layer.bias, a.weight, b.weight, s)
            # Few tokens (decoding): W x + s·B(A x) in three kernels, the low-rank product added by addmm
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(F.linear(flat, self.linear_weight(), self.base_layer.bias), F.linear(flat, a.weight),
                              b.weight.T, alpha=s)
            return out.view(*x.shape[:-1], out.shape[-1])
        out = self.base_layer(x)
        h = dropout(x).to(a.weight.dtype)
        return out + (b(a(h)) * self.scaling[self.active]).to(out.dtype)

    def _dora_forward(self, x, a, b, dropout, no_dropout) -> torch.Tensor:
        # m/||W + sBA|| · (W + sBA) x, written as a correction on top of the base output (as PEFT).
        out = self.base_layer(x)
        s = self.scaling[self.active]
        scale = (self.lora_magnitude_vector[self.active] / self.dora_norm(self.active)).to(out.dtype)
        h = dropout(x)
        bias = self.base_layer.bias
        base = (out - bias if bias is not None else out) if no_dropout else F.linear(h, self.linear_weight())
        lora = b(a(h.to(a.weight.dtype))).to(out.dtype)
        return out + (scale - 1) * base + scale * lora * s


class LoRAEmbedding(nn.Module):
    """A frozen nn.Embedding with named LoRA adapters: rows of A (r x vocab) are looked up, then
    projected by B. A starts at zero and B normal, as in PEFT."""

    def __init__(self, base: nn.Embedding, adapter: str, r: int, alpha: float, dropout: float, rslora: bool,
                 dora: bool = False, init: str = "kaiming"):
        super().__init__()
        self.base_layer = base
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged = False
        self.add_adapter(adapter, r, alpha, dropout, rslora, dora, init)

    def stores(self) -> tuple:
        return self.lora_embedding_A, self.lora_embedding_B

    def state(self, adapter: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[adapter], "lora_embedding_B": self.lora_embedding_B[adapter]}

    def add_adapter(self, adapter: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool = False,
                    init: str = "kaiming") -> None:
        if dora or init != "kaiming":
            raise ValueError("LoRA on embedding layers supports neither DoRA nor PiSSA/OLoRA init; "
                             "leave the embeddings out of target_modules or use the default init")
        n, d = self.base_layer.weight.shape
        device = self.base_layer.weight.device
        self.lora_embedding_A[adapter] = nn.Parameter(torch.zeros(r, n, device=device))
        self.lora_embedding_B[adapter] = nn.Parameter(torch.randn(d, r, device=device))
        self.scaling[adapter] = scaling(alpha, r, rslora)
        self.active = adapter

    def delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_embedding_B[adapter] @ self.lora_embedding_A[adapter]).T * self.scaling[adapter]

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge
    lora_magnitude_vector: dict = {}  # no DoRA here; lets the shared merge code ask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.active is None or self.merged:
            return out
        b = self.base_layer
        h = F.embedding(x, self.lora_embedding_A[self.active].T, b.padding_idx, b.max_norm, b.norm_type,
                        b.scale_grad_by_freq, b.sparse)
        delta = h @ self.lora_embedding_B[self.active].T * self.scaling[self.active]
        scale = getattr(b, "embed_scale", None)  # Gemma scales its embeddings; the update too
        return out + (delta * scale if scale is not None else delta).to(out.dtype)


class LoRAConv2d(LoRALinear):
    """A frozen nn.Conv2d with LoRA: A is a conv with the base's kernel, stride and padding into r
    channels, B a 1x1 conv back out (PEFT's layout)."""

    def __init__(self, base: nn.Conv2d, adapter: str, r: int, alpha: float, dropout: float, rslora: bool,
                 dora: bool = False, init: str = "kaiming"):
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        nn.Module.__init__(self)
        self.base_layer, self.fan_in_fan_out = base, False
        self._new_stores()
        self.add_adapter(adapter, r, alpha, dropout, rslora, dora, init)

    def add_adapter(self, adapter: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool = False,
                    init: str = "kaiming") -> None:
        if dora or init != "kaiming":
            raise ValueError("LoRA on Conv2d supports neither DoRA nor PiSSA/OLoRA init; leave the convolutions "
                             "out of target_modules or use the default init")
        c = self.base_layer
        device = c.weight.device
        self.lora_A[adapter] = nn.Conv2d(c.in_channels, r, c.kernel_size, c.stride, c.padding, c.dilation,
                                         bias=False, device=device)
        self.lora_B[adapter] = nn.Conv2d(r, c.out_channels, 1, bias=False, device=device)
        self.lora_dropout[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter] = scaling(alpha, r, rslora)
        nn.init.kaiming_uniform_(self.lora_A[adapter].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter].weight)
        self.active = adapter

    def delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        # B (out, r, 1, 1) applied after A (r, in, kh, kw) is one conv with weight B·A over the r axis.
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling[adapter]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.active is None or self.merged:
            return out
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        h = self.lora_dropout[self.active](x).to(a.weight.dtype)
        return out + (b(a(h)) * self.scaling[self.active]).to(out.dtype)


class ModuleToSave(nn.Module):
    """A module trained in full beside the adapters (a classification head), laid out as PEFT's
    ModulesToSaveWrapper: the original stays frozen and each adapter trains its own copy, so
    switching or disabling adapters gives the base module back. A copy of a head tied to the
    input embeddings is untied from them (PEFT does the same)."""

    merged = False  # a copy has nothing to fold in; lets disabled() treat it like a LoRA layer

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None

    def add_adapter(self, adapter: str) -> None:
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module)
        self.active = adapter

    def forward(self, *args, **kwargs):
        return (self.modules_to_save[self.active] if self.active else self.original_module)(*args, **kwargs)


LAYERS = {nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d, QuantEmbedding: LoRAEmbedding}


def targets(model: nn.Module, cfg: Config) -> list[str]:
    """The modules the adapter goes on: target_modules, less exclude_modules, within layers_to_transform."""
    names = find_targets(model, cfg.target_modules or default_targets(model), extra=tuple(LAYERS))
    layers = [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else cfg.layers_to_transform
    kept = [n for n in names if not (cfg.exclude_modules and matches(n, cfg.exclude_modules))
            and (not layers or layer_index(n, cfg.layers_pattern) in layers)]
    if not kept:
        raise ValueError(f"exclude_modules={cfg.exclude_modules!r} and layers_to_transform={cfg.layers_to_transform!r} "
                         f"leave none of the {len(names)} modules that target_modules {cfg.target_modules!r} matches")
    return kept


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> nn.Module:
    """Add adapter `adapter` to every target layer (beside any adapters already there) and make it active."""
    model.requires_grad_(False)
    add_modules_to_save(model, cfg.modules_to_save, adapter)
    for name in targets(model, cfg):
        args = (pattern_value(cfg.rank_pattern, name, cfg.r), pattern_value(cfg.alpha_pattern, name, cfg.alpha),
                cfg.dropout, cfg.rslora, cfg.dora, cfg.init)
        layer = model.get_submodule(name)
        if isinstance(layer, LORA_TYPES):
            if adapter in layer.scaling:
                raise ValueError(f"{name} already has an adapter named '{adapter}'")
            layer.add_adapter(adapter, *args)
        else:
            set_module(model, name, LAYERS.get(type(layer), LoRALinear)(layer, adapter, *args))
    set_adapter(model, adapter)
    return model


def add_modules_to_save(model: nn.Module, names: list[str] | None, adapter: str = "default") -> None:
    """Give every module `names` picks a trained copy for `adapter` (PEFT's modules_to_save), trainable."""
    for name in find_modules_to_save(model, names) if names else []:
        module = model.get_submodule(name)
        if any(getattr(m, "quantized", False) for m in module.modules()):
            raise ValueError(f"modules_to_save names {name}, which is stored quantized: a module trained in full "
                             "needs its full-precision weights, so load it unquantized")
        if not isinstance(module, ModuleToSave):
            module = ModuleToSave(module)
            set_module(model, name, module)
        elif adapter in module.modules_to_save:
            raise ValueError(f"{name} already has a trained copy for adapter '{adapter}'")
        module.add_adapter(adapter)
        module.modules_to_save[adapter].requires_grad_(True)


def saved_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The trained copies of modules_to_save, under the modules' own names (`score.weight`), as PEFT saves them."""
    return {f"{name}.{k}": t for name, m in saved_modules(model) if adapter in m.modules_to_save
            for k, t in m.modules_to_save[adapter].state_dict(keep_vars=True).items()}


def set_adapter(model: nn.Module, adapter: str) -> None:
    """Make `adapter` the active one (and the one that trains); layers without it run as the base."""
    layers = lora_layers(model)
    if not any(adapter in m.scaling for _, m in layers):
        names = sorted({a for _, m in layers for a in m.scaling})
        raise ValueError(f"no adapter named '{adapter}'; this model has {names}")
    for _, m in saved_modules(model):
        m.active = adapter if adapter in m.modules_to_save else None
        for name, trained in m.modules_to_save.items():
            trained.requires_grad_(name == adapter)
    for _, m in layers:
        if m.merged:
            raise RuntimeError("unmerge adapters before switching")
        m.active = adapter if adapter in m.scaling else None
        for name, p in m.named_parameters():
            if not name.startswith("base_layer."):  # lora_A.<adapter>.weight, lora_embedding_A.<adapter>, ...
                p.requires_grad_(name.split(".")[1] == adapter)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove an adapter; a layer left with none becomes its plain base layer again."""
    for name, m in saved_modules(model):
        if adapter in m.modules_to_save:
            del m.modules_to_save[adapter]
            m.active = None if m.active == adapter else m.active
            if not len(m.modules_to_save):
                set_module(model, name, m.original_module)
    for name, m in lora_layers(model):
        if adapter not in m.scaling:
            continue
        if adapter in getattr(m, "lora_init", {}):  # give the base back what PiSSA/OLoRA took out of it
            a0, b0 = m.lora_init.pop(adapter)
            with torch.no_grad():
                delta = m.scaling[adapter] * b0 @ a0
                m.base_layer.weight.add_((delta.T if m.fan_in_fan_out else delta).to(m.base_layer.weight.dtype))
        for store in m.stores():
            if adapter in store:
                del store[adapter]
        m.scaling.pop(adapter)
        if m.active == adapter:
            m.active = None
        if not m.scaling:
            set_module(model, name, m.base_layer)


LORA_TYPES = (LoRALinear, LoRAEmbedding)  # LoRAConv2d is a LoRALinear


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear | LoRAEmbedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LORA_TYPES)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModuleToSave]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModuleToSave)]


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's live tensors under PEFT's names (without the `base_model.model.` prefix).
    A module trained in full is saved under its own name (`score.weight`), as PEFT saves it."""
    state = {f"{name}.{k}": t for name, layer in lora_layers(model) if adapter in layer.scaling
             for k, t in layer.state(adapter).items()}
    return state | saved_state(model, adapter)


def target_modules(model: nn.Module, adapter: str) -> str | list[str]:
    """What to save as target_modules so that PEFT and unitune wrap exactly the adapter's layers:
    their leaf names when those pick out no other layer (the form vLLM reads too), else a regex
    that names each layer (a subset of blocks, a regex target, layers_to_transform)."""
    names = {n for n, m in lora_layers(model) if adapter in m.scaling}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    # PEFT wraps every module a leaf name matches (an error for a block named `0`, as in a CNN's `downsample.0`)
    if {n for n, _ in model.named_modules() if n and matches(n, leaves)} == names:
        return leaves
    return "|".join(re.escape(n) for n in sorted(names))


def peft_config(cfg: Config, model: nn.Module, adapter: str = "default") -> dict:
    layers = lora_layers(model)
    # PiSSA/OLoRA adapters are saved converted to rank 2r on the original base (see LoRALinear.state)
    r_times, alpha_times = (2, 2 ** 0.5 if cfg.rslora else 2) if cfg.init != "kaiming" else (1, 1)
    return {
        "r": cfg.r * r_times, "lora_alpha": cfg.alpha * alpha_times, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora, "target_modules": target_modules(model, adapter),
        "rank_pattern": {k: v * r_times for k, v in cfg.rank_pattern.items()},
        "alpha_pattern": {k: v * alpha_times for k, v in cfg.alpha_pattern.items()},
        "modules_to_save": cfg.modules_to_save,
        "bias": "none", "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for _, m in layers),
        "init_lora_weights": True, "use_dora": cfg.dora,
    }


def config_from_peft(raw: dict, where) -> Config:
    try:
        return Config(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                      target_modules=raw["target_modules"], rslora=raw.get("use_rslora", False),
                      dora=bool(raw.get("use_dora", False)), rank_pattern=raw.get("rank_pattern") or {},
                      alpha_pattern=raw.get("alpha_pattern") or {}, layers_to_transform=raw.get("layers_to_transform"),
                      layers_pattern=raw.get("layers_pattern"), exclude_modules=raw.get("exclude_modules"),
                      modules_to_save=raw.get("modules_to_save"))
    except ValidationError as err:
        raise ValueError(f"{where}: adapter_config.json is not a LoRA config unitune can load: {err}") from None


class disabled:
    """Context manager: run the base model with every adapter switched off (no second copy)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for _, m in lora_layers(model) + saved_modules(model)]

    def __enter__(self):
        self.saved = [m.active for m in self.layers]
        for m in self.layers:
            if m.merged:
                raise RuntimeError("cannot disable a merged adapter; unmerge it first")
            m.active = None

    def __exit__(self, *exc):
        for m, a in zip(self.layers, self.saved):
            m.active = a


class for_generation:
    """Context manager for rollouts: each active plain LoRA layer runs on W + s·B·A, built once on entry
    (out of place) and dropped on exit, so decoding runs at the merged model's speed, W is never
    touched (an in-place merge and unmerge would round it a little every rollout) and training resumes
    on the exact weights. Costs a transient copy of the adapted weights; quantized bases and DoRA keep
    their own forward. For no-grad use only: the folded weight carries no gradient to A and B."""

    def __init__(self, model: nn.Module):
        self.layers = [m for _, m in lora_layers(model) if type(m) is LoRALinear and m.active is not None
                       and not m.merged and m.active not in m.lora_magnitude_vector
                       and not getattr(m.base_layer, "quantized", False)]

    def __enter__(self):
        with torch.no_grad():
            for m in self.layers:  # (out, in), as F.linear takes it, whatever the base's layout
                w, a, b = m.linear_weight(), m.lora_A[m.active].weight, m.lora_B[m.active].weight
                m._folded = torch.addmm(w, b.to(w.dtype), a.to(w.dtype), alpha=m.scaling[m.active])
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.__dict__.pop("_folded", None)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight and put the plain layer back.

    An embedding tied to the LM head (SmolLM2, Gemma, ...) is untied first: the update belongs to
    the input embeddings only, and folding it into a shared weight would change the head too.
    """
    model = dequantize_model(model)  # QLoRA: merge into the dequantized weights (a quantized tied table, tied)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, layer in lora_layers(model):
        if isinstance(layer, LoRAEmbedding) and getattr(head, "weight", None) is layer.base_layer.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
            _untie(model)
        layer.merge()
        set_module(model, name, layer.base_layer)
    for name, m in saved_modules(model):  # the trained copy takes the original's place
        if m is head or (hasattr(model, "get_input_embeddings") and m is model.get_input_embeddings()):
            _untie(model)  # the copy has its own weight: a saved tie would put the original back
        set_module(model, name, m.modules_to_save[m.active] if m.active else m.original_module)
    return model


def _untie(model: nn.Module) -> None:
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
