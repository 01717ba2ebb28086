"""Frozen weights in 4-bit NormalFloat (Dettmers et al., 2023) or 8-bit blockwise, in plain PyTorch.

The byte layout is bitsandbytes': the flattened weight in blocks of 64, each block scaled by its
absolute maximum and rounded to the nearest of 16 NF4 levels, two codes per byte (first in the
high nibble), or of the 256 levels of bitsandbytes' dynamic map, one per byte (its
quantize_blockwise). Double quantisation stores the block maxima minus their mean as 8-bit
codes, in blocks of 256 with one fp32 scale each. An NF4 weight then costs
4 + 8/64 + 32/(64*256) ≈ 4.13 bits, 0.26x its bf16 size; an 8-bit one 8.13 bits, 0.51x. The
same buffers feed bitsandbytes' CUDA kernel for NF4 where it is installed; elsewhere the weight
is dequantized per use. Block sizes are those bitsandbytes accepts (its functional.quantize_4bit:
32 to 4096, powers of two; quantize_blockwise, the 8-bit one: 64 and up), so the layout stays theirs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

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


NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit
INT8_BLOCKSIZES = NF4_BLOCKSIZES[1:]  # its quantize_blockwise
_CHUNK = 1 << 22  # weights quantized at a time: the float temporaries stay ~16 MB whatever the layer


def _blockwise(flat: torch.Tensor, levels: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level codes of each block scaled by its absmax, two to a byte for the 16 NF4 levels,
    and the absmaxes (a short last block allowed).

    Chunk by chunk into outputs allocated once: for a whole 7B embedding table, an fp32 copy and
    int32 codes would be 1 GB beside the weight, the memory the loader quantizes as it reads to save."""
    n, per_byte = flat.numel(), 2 if levels.numel() == 16 else 1
    codes = torch.empty(-(-n // per_byte), dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    bounds = ((levels[:-1] + levels[1:]) / 2).to(flat.device)
    step = blocksize * max(1, _CHUNK // blocksize)  # whole blocks, an even count of weights
    for start in range(0, n, step):
        chunk = flat[start:start + step].to(torch.float32, copy=True)
        full = chunk.numel() - chunk.numel() % blocksize
        scale = absmax[start // blocksize:-(-(start + chunk.numel()) // blocksize)]
        torch.amax(chunk[:full].view(-1, blocksize).abs(), 1, out=scale[:full // blocksize])
        if full < chunk.numel():
            scale[-1] = chunk[full:].abs().amax()
        scaled = _scale_blocks_(chunk, 1.0 / scale.clamp(min=1e-38), blocksize).clamp_(-1, 1)
        code = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
        if per_byte == 2:  # the first weight of each pair in the high nibble, as bitsandbytes packs them
            code = F.pad(code, (0, code.numel() % 2))
            code = (code[::2] << 4) | code[1::2]
        codes[start // per_byte:start // per_byte + code.numel()] = code
    return codes, absmax


@functools.cache
def _bitsandbytes():
    try:
        import bitsandbytes.functional as F4
    except ImportError:
        return None
    return F4


class QuantWeight(nn.Module):
    """A frozen weight matrix stored in NF4 (bits=4) or 8 bits: what QuantLinear and QuantEmbedding hold.

    Used as a matrix, it dequantizes on the fly in forward and again in backward and keeps nothing
    but the codes between them, so the saved activations are the input only, as with
    bitsandbytes' Linear4bit.
    """

    quantized = True

    def __init__(self, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, bits: int = 4):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 (NF4) or 8, not {bits}")
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.double_quant, self.bits = blocksize, double_quant, bits
        self.compute_dtype = weight.dtype  # what an embedding lookup returns; a matmul computes in its input's
        codes, absmax = _blockwise(weight.detach().reshape(-1), self.levels(), blocksize)
        self.register_buffer("packed", codes)
        if double_quant:  # absmax - mean in 8 bits, blocks of 256 (bitsandbytes' compress_statistics)
            offset = absmax.mean()
            qabsmax, absmax2 = _blockwise(absmax - offset, dynamic_map(), 256)
            self.register_buffer("absmax", qabsmax)
            self.register_buffer("absmax2", absmax2)
            self.register_buffer("offset", offset.reshape(()))
        else:
            self.register_buffer("absmax", absmax)

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
        """The (out_features, in_features) matrix."""
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


class QuantLinear(QuantWeight):
    """A frozen nn.Linear or GPT-2 Conv1D stored in NF4 or 8 bits; computes in the dtype of its input.

    It stands in for the layer it replaced: a Conv1D's keeps `fan_in_fan_out` and shows its weight
    as Conv1D does, (in, out), so LoRA over it does the same arithmetic as over the Conv1D (DoRA's
    row norms, merging), and it dequantizes back to a Conv1D that GPT-2 saves and reloads.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int = 64, double_quant: bool = True,
                 bits: int = 4, fan_in_fan_out: bool = False):
        super().__init__(weight.T if fan_in_fan_out else weight, blocksize, double_quant, bits)
        self.fan_in_fan_out = fan_in_fan_out
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_layer(cls, layer: nn.Module, blocksize: int = 64, double_quant: bool = True, bits: int = 4) -> QuantLinear:
        """An nn.Linear or Conv1D, quantized."""
        return cls(layer.weight, layer.bias, blocksize, double_quant, bits, fan_in_fan_out=isinstance(layer, Conv1D))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the replaced layer's layout (a new tensor: writing to it changes nothing)."""
        w = self.dequantize()
        return w.T if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantMatmul.apply(x, self, self.bias)

    def to_linear(self) -> nn.Module:
        """The full-precision layer back: an nn.Linear, or the Conv1D it was."""
        out = (Conv1D(self.out_features, self.in_features) if self.fan_in_fan_out
               else nn.Linear(self.in_features, self.out_features, bias=self.bias is not None))
        out = out.to(self.packed.device, self.compute_dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)


class QuantEmbedding(QuantWeight):
    """A frozen embedding table in NF4 or 8 bits. Given token ids it returns their rows
    (dequantizing only those); given hidden states it is the tied output head (logits against every row)."""

    def __init__(self, base: nn.Embedding, blocksize: int = 64, double_quant: bool = True, bits: int = 4):
        super().__init__(base.weight, blocksize, double_quant, bits)
        self.num_embeddings, self.embedding_dim, self.padding_idx = *base.weight.shape, base.padding_idx
        # nn.Embedding's lookup options, as the table had them: a LoRA on this table looks its own rows up with them
        self.max_norm, self.norm_type = base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        scale = getattr(base, "embed_scale", None)  # Gemma scales embeddings on lookup
        self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).detach().clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return _QuantMatmul.apply(x, self, None)
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


def quantizable_embedding(emb: nn.Module) -> bool:
    """An nn.Embedding whose lookup QuantEmbedding reproduces: plain, or scaled as Gemma's."""
    return isinstance(emb, nn.Embedding) and (type(emb) is nn.Embedding or hasattr(emb, "embed_scale"))


def dequantize_model(model: nn.Module) -> nn.Module:
    """Full-precision layers back in place of the quantized ones (a tied embedding and head tied again)."""
    plain: dict[int, nn.Module] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, QuantWeight):
            if id(m) not in plain:
                plain[id(m)] = m.to_embedding() if isinstance(m, QuantEmbedding) else m.to_linear()
            model.set_submodule(name, plain[id(m)])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Embedding):  # it was the tied table: a Linear over the same weight
        linear = nn.Linear(head.embedding_dim, head.num_embeddings, bias=False, device=head.weight.device)
        linear.weight = head.weight
        model.set_output_embeddings(linear)
    return model
