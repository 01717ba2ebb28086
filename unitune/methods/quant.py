"""Frozen weights in 4-bit NormalFloat (Dettmers et al., 2023) or 8-bit blockwise, in plain PyTorch.

The byte layout is bitsandbytes': the flattened weight in blocks of 64, each block scaled by its
absolute maximum and rounded to the nearest of 16 NF4 levels, two codes per byte (first in the
high nibble), or of the 256 levels of bitsandbytes' dynamic map, one per byte (its
quantize_blockwise). Double quantisation stores the block maxima minus their mean as 8-bit
codes, in blocks of 256 with one fp32 scale each. An NF4 weight then costs
4 + 8/64 + 32/(64*256) ≈ 4.13 bits, 0.26x its bf16 size; an 8-bit one 8.13 bits, 0.51x. The
same buffers feed bitsandbytes' CUDA kernel for NF4 where it is installed; elsewhere the weight
is dequantized per use.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted levels."""
    data = []
    for i in range(7):  # exponent 10^-6 .. 10^0, with 2^i fraction levels each, both signs
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2.0).tolist()
        data += [10 ** (i - 6) * m for m in means] + [-(10 ** (i - 6)) * m for m in means]
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply each block of the flat `values` by its scale, in place (a weight-sized copy saved)."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:] *= absmax[-1]
    return values


@functools.cache
def _byte_levels(device: torch.device) -> torch.Tensor:
    """(256, 2): the two NF4 levels each packed byte holds, so dequantizing is one gather per byte."""
    byte = torch.arange(256)
    return torch.stack([NF4_LEVELS[byte >> 4], NF4_LEVELS[byte & 0xF]], dim=1).to(device)


def _blockwise(flat: torch.Tensor, levels: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level codes of each block scaled by its absmax, and the absmaxes (a short last block allowed)."""
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax()[None]])
    scaled = _scale_blocks_(flat.clone(), 1.0 / absmax.clamp(min=1e-38), blocksize).clamp(-1, 1)
    bounds = ((levels[:-1] + levels[1:]) / 2).to(flat.device)
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


@functools.cache
def _bitsandbytes():
    try:
        import bitsandbytes.functional as F4
    except ImportError:
        return None
    return F4


class QuantLinear(nn.Module):
    """A frozen linear layer stored in NF4 (bits=4) or 8 bits; computes in the dtype of its input.

    Forward and backward dequantize the weight on the fly and keep nothing but the codes between
    them, so the saved activations are the input only, as with bitsandbytes' Linear4bit.
    """

    quantized = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int = 64, double_quant: bool = True,
                 bits: int = 4):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 (NF4) or 8, not {bits}")
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.double_quant, self.bits = blocksize, double_quant, bits
        self.compute_dtype = weight.dtype  # what an embedding lookup returns; a linear computes in its input's
        codes, absmax = _blockwise(weight.detach().float().reshape(-1), self.levels(), blocksize)
        if bits == 4:
            codes = F.pad(codes, (0, codes.numel() % 2))
            codes = (codes[::2] << 4) | codes[1::2]
        self.register_buffer("packed", codes)
        if double_quant:  # absmax - mean in 8 bits, blocks of 256 (bitsandbytes' compress_statistics)
            offset = absmax.mean()
            qabsmax, absmax2 = _blockwise(absmax - offset, dynamic_map(), 256)
            self.register_buffer("absmax", qabsmax)
            self.register_buffer("absmax2", absmax2)
            self.register_buffer("offset", offset.reshape(()))
        else:
            self.register_buffer("absmax", absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def block_absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        code = dynamic_map().to(self.absmax.device)
        return _scale_blocks_(code[self.absmax.long()], self.absmax2, 256) + self.offset

    def _apply(self, fn, recurse=True):
        """model.to(device) moves the quantized state; model.to(dtype) leaves it as it is (casting
        the fp32 scales to bf16 would change every weight) and sets the compute dtype instead."""
        state = {k: v for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        for k, before in state.items():
            after = self._buffers[k]
            if after.dtype != before.dtype:
                self.compute_dtype = after.dtype
                self._buffers[k] = before.to(after.device)
        return self

    def levels(self) -> torch.Tensor:
        return NF4_LEVELS if self.bits == 4 else dynamic_map()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.packed.is_cuda and self.bits == 4 and _bitsandbytes() is not None:
            return self.dequantize_bnb(dtype)
        return self.dequantize_torch(dtype)

    def dequantize_bnb(self, dtype: torch.dtype) -> torch.Tensor:
        """bitsandbytes' CUDA kernel on our buffers (the same layout)."""
        F4 = _bitsandbytes()
        code = NF4_LEVELS.to(self.packed.device)
        nested = F4.QuantState(absmax=self.absmax2, code=dynamic_map().to(code.device), blocksize=256,
                               dtype=torch.float32) if self.double_quant else None
        state = F4.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=code,
                              blocksize=self.blocksize, quant_type="nf4", dtype=dtype,
                              offset=self.offset if self.double_quant else None, state2=nested)
        return F4.dequantize_4bit(self.packed[:, None], state).to(dtype)

    def dequantize_torch(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = self.out_features * self.in_features
        table = _byte_levels(self.packed.device) if self.bits == 4 else dynamic_map().to(self.packed.device)
        values = table.index_select(0, self.packed.int()).view(-1)[:n]
        return _scale_blocks_(values, self.block_absmax(), self.blocksize).view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor: writing to it changes nothing)."""
        return self.dequantize()

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantMatmul.apply(x, self, self.bias)

    def to_linear(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.packed.device,
                        dtype=self.compute_dtype)
        with torch.no_grad():
            out.weight.copy_(self.dequantize())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)

    def extra_repr(self) -> str:
        kind = "nf4" if self.bits == 4 else "int8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")


class _QuantMatmul(torch.autograd.Function):
    """x W^T + b with W dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None, None


class QuantEmbedding(QuantLinear):
    """A frozen embedding table in NF4 or 8 bits. Given token ids it returns their rows
    (dequantizing only those); given hidden states it is the tied output head (logits against every row)."""

    def __init__(self, base: nn.Embedding, blocksize: int = 64, double_quant: bool = True, bits: int = 4):
        super().__init__(base.weight, None, blocksize, double_quant, bits)
        self.num_embeddings, self.embedding_dim, self.padding_idx = *base.weight.shape, base.padding_idx
        scale = getattr(base, "embed_scale", None)  # Gemma scales embeddings on lookup
        self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).detach().clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return super().forward(x)
        rows = self.lookup(x).to(self.compute_dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        n, dim, bs = self.num_embeddings, self.embedding_dim, self.blocksize
        if dim % bs or dim * self.bits % 8 or self.packed.is_cuda:  # blocks straddle rows, or a GPU is at hand
            return F.embedding(ids, self.dequantize())
        table = _byte_levels(ids.device) if self.bits == 4 else dynamic_map().to(ids.device)
        rows = self.packed.view(n, dim * self.bits // 8)[ids]
        values = table.index_select(0, rows.reshape(-1).int()).view(*ids.shape, dim // bs, bs)
        scale = self.block_absmax().view(n, dim // bs)[ids]
        return (values * scale[..., None]).view(*ids.shape, dim)

    def to_embedding(self) -> nn.Embedding:
        out = (nn.Embedding if self.embed_scale is None else ScaledEmbedding)(
            self.num_embeddings, self.embedding_dim, self.padding_idx, device=self.packed.device, dtype=self.compute_dtype)
        if self.embed_scale is not None:
            out.register_buffer("embed_scale", self.embed_scale.clone(), persistent=False)
        with torch.no_grad():
            out.weight.copy_(self.dequantize())
        return out.requires_grad_(False)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("in_features", "embedding_dim").replace("out_features", "num_embeddings")


class ScaledEmbedding(nn.Embedding):
    """An embedding whose lookups are multiplied by a constant, as Gemma's: what a scaled table dequantizes to."""

    embed_scale: torch.Tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def quantize_embeddings(model: nn.Module, blocksize: int = 64, double_quant: bool = True, bits: int = 4) -> list[str]:
    """Store the input embedding table in NF4 or 8 bits, and the output head with it: one table if
    the two are tied, else the head as a QuantLinear. Returns the names replaced ([] for models without
    transformers' embedding accessors, or an embedding subclass whose lookup we do not know)."""
    from unitune.methods.targets import set_module

    if not hasattr(model, "get_input_embeddings"):
        return []
    emb = model.get_input_embeddings()
    emb = getattr(emb, "base_layer", emb)  # a LoRA-wrapped embedding: quantize what it wraps
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding) or (type(emb) is not nn.Embedding and not hasattr(emb, "embed_scale")):
        return []
    where = lambda mod: [n for n, m in model.named_modules(remove_duplicate=False) if m is mod]  # noqa: E731
    emb_names, head_names = where(emb), where(head) if isinstance(head, nn.Linear) else []
    table = QuantEmbedding(emb, blocksize, double_quant, bits)
    for name in emb_names:
        set_module(model, name, table)
    if head_names:
        tied = head.weight is emb.weight
        quantized_head = table if tied else QuantLinear(head.weight, head.bias, blocksize, double_quant, bits)
        for name in head_names:
            set_module(model, name, quantized_head)
    return emb_names + head_names


def quantize_model(model: nn.Module, skip: set[str], blocksize: int = 64, double_quant: bool = True) -> int:
    """Replace every nn.Linear / GPT-2 Conv1D outside `skip` with an NF4 QuantLinear; returns how many."""
    from transformers.pytorch_utils import Conv1D

    from unitune.methods.targets import set_module

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n not in skip]
    for name in names:
        layer = model.get_submodule(name)
        weight = layer.weight.T if isinstance(layer, Conv1D) else layer.weight  # Conv1D stores (in, out)
        set_module(model, name, QuantLinear(weight, layer.bias, blocksize, double_quant))
    return len(names)
