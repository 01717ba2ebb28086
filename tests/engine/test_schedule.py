import math

import pytest
import torch

from unitune.engine.precision import resolve_precision
from unitune.engine.schedule import lr_factor


def test_warmup_then_cosine_to_floor():
    f = [lr_factor(s, warmup=4, total=20, kind="cosine", floor=0.1) for s in range(21)]
    assert f[0] == pytest.approx(1 / 5) and f[3] == pytest.approx(4 / 5) and f[4] == pytest.approx(1.0)
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_linear_and_constant():
    assert lr_factor(10, 0, 20, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(15, 0, 20, "constant", 0.0) == 1.0


def test_cpu_precision_never_emulates_bf16(monkeypatch):
    from unitune.engine import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
