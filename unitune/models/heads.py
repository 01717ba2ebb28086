"""A causal LM as objectives and methods see it: the backbone that makes hidden states, and the
map from hidden states to the model's logits.

Objectives never call `model(...)` for a loss: it projects every position onto the vocabulary,
and most positions carry no loss. They run the backbone and project only the positions they
need. But `forward` does more than the output layer in many families: Gemma softcaps, Cohere
multiplies by `logit_scale`, Granite divides by `logits_scaling`. Skipping that trains on a
loss that is not the model's. `logits` applies every post-processing POSTPROCESS knows, and
`verify` checks once per model, against the model's own forward, that nothing else is missing.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

# The logit post-processing of transformers 5.x `*ForCausalLM.forward`, keyed by the config field
# that turns it on, in the order the modeling files apply it. A family that does anything else
# fails `verify` and is added here.
POSTPROCESS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "logit_scale": lambda x, s: x * s,  # Cohere, Cohere2
    "logits_scaling": lambda x, s: x / s,  # Granite, GraniteMoE (muP: the head's width multiplier)
    "final_logit_softcapping": lambda x, c: torch.tanh(x / c) * c,  # Gemma 2/3, VaultGemma, nanochat
}

PROBE_TOKENS = 8
_verified: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits for hidden states (..., hidden) of the backbone, as the model's forward makes them."""
    out = model.get_output_embeddings()(hidden).float()
    config = model.config.get_text_config()  # multimodal models keep these fields on the text config
    for field, post in POSTPROCESS.items():
        if (value := getattr(config, field, None)) is not None:
            out = post(out, value)
    return out


@contextmanager
def probing(model: nn.Module) -> Iterator[torch.device]:
    """Run a few probe forwards: eval mode (no dropout, so the training's random stream does not
    move), no gradients, no autocast (the model's own dtype). Yields the device for the inputs."""
    device = next(model.parameters()).device  # not the embedding's .weight: a quantized one dequantizes for it
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield device
    finally:
        model.train(was_training)


def probe_ids(model: nn.Module, n: int, stride: int, device: torch.device) -> torch.Tensor:
    """n token ids spread over the vocabulary, made without touching any random generator."""
    return torch.arange(1, n + 1, device=device) * stride % model.config.get_text_config().vocab_size


def tolerance(x: torch.Tensor) -> float:
    """What two computations of x that should agree may differ by: fp32 rounding, or half precision's."""
    return (1e-4 if x.dtype == torch.float32 else 2e-2) * max(1.0, float(x.abs().max()))


def verify(model: nn.Module) -> None:
    """Raise unless `logits(backbone(x))` equals `model(x).logits` on a few tokens. Once per model."""
    if model in _verified:
        return
    with probing(model) as device:
        ids = probe_ids(model, PROBE_TOKENS, 7, device)[None]
        want = model(input_ids=ids, use_cache=False).logits
        got = logits(model, backbone(model)(input_ids=ids, use_cache=False).last_hidden_state)
    diff = float((got - want.float()).abs().max())
    if diff > tolerance(want):
        raise ValueError(
            f"unitune cannot reproduce the logits of {type(model).__name__} (model_type "
            f"'{model.config.model_type}'): its forward post-processes them in a way unitune/models/heads.py "
            f"does not know (max difference {diff:.3g} on a probe), so the loss would not be the model's. "
            "Add the rule to POSTPROCESS there, or use a supported family."
        )
    _verified.add(model)
