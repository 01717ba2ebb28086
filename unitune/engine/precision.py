"""Device and mixed-precision choices.

On a CPU without native bf16 (no AVX512-BF16 / AMX) bf16 is emulated and about 20x slower
(FIELD-NOTES trap 1), so "auto" only autocasts where the hardware does the work.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return device


@lru_cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool = True) -> torch.dtype | None:
    """The autocast dtype for this device, or None for plain fp32. `cpu_bf16=False`: `auto` stays fp32 on a CPU
    even with native bf16 (convolutional networks run slower under CPU autocast: MobileNetV2 at 64 px, 0.25 s
    a step of 64 images in bf16, 0.16 s in fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16":
        raise ValueError("train.precision=fp16 is for CUDA devices; on a CPU use auto, bf16 or fp32")
    if precision == "bf16" or (precision == "auto" and cpu_bf16 and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
