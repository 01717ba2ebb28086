"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay to min_lr_ratio."""
from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup: int, total: int, kind: str, floor: float) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return floor + (1 - floor) * decay


def make_scheduler(opt: Optimizer, total: int, warmup: int, kind: str, floor: float) -> LambdaLR:
    return LambdaLR(opt, partial(lr_factor, warmup=warmup, total=total, kind=kind, floor=floor))
