"""Virtual tokens: what prompt tuning, P-tuning and prefix tuning share.

The trained module lives at `model.prompt_encoder` and produces a table of `n` virtual tokens:
input embeddings (prompt tuning, P-tuning) or per-layer keys and values (prefix tuning). Two
hooks on the transformer backbone put them in front of every sequence, for training, evaluation
and KV-cache generation alike:

- embeddings: at the first call of a sequence (empty cache) the n embeddings are concatenated
  before the input's, and the backbone's output drops those n positions again, so logits and
  targets line up as if nothing was added;
- prefix: at the first call the keys and values go into the (new or given) cache, as if n tokens
  had been seen already;
- every call: the attention mask gets n leading ones and position ids move n places on, so a
  decoding step sees the virtual tokens as well (with PEFT's positions: the real tokens start at n).

Packed rows hold several sequences, but the virtual tokens would sit only before the first, so
these methods refuse packing (PACKING = False).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from unitune.models.heads import backbone


def dims(model: nn.Module) -> dict:
    """Hidden size, layer count, KV heads and head size, read from any decoder config."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or c.d_model
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


def _cache_length(past) -> int:
    return past.get_seq_length() if past is not None else 0


def attach(model: nn.Module, encoder: nn.Module, kind: str) -> nn.Module:
    """Freeze the model, make `encoder` its trainable `prompt_encoder`, hook the backbone.

    `encoder(batch_size)` returns (batch, n, hidden) embeddings for kind 'embeddings', or a list
    of per-layer (keys, values), each (batch, kv_heads, n, head_dim), for kind 'prefix'.
    """
    model.requires_grad_(False)
    if hasattr(model, "prompt_encoder"):
        raise ValueError("this model already has virtual tokens; one prompt method at a time")
    model.prompt_encoder = encoder
    n, config, body = encoder.num_virtual_tokens, model.config, backbone(model)
    state = {"strip": False}

    def before(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:  # input_ids given positionally
            kwargs["input_ids"], args = args[0], args[1:]
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, device = ref.shape[0], ref.device
        first = _cache_length(kwargs.get("past_key_values")) == 0
        if kwargs.get("attention_mask") is not None:
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            pos = pos + n
            if kind == "embeddings" and first:
                pos = torch.cat([torch.arange(n, device=device).expand(pos.shape[0], n), pos], dim=1)
            kwargs["position_ids"] = pos
        state["strip"] = False
        if not first:
            return args, kwargs
        if kind == "embeddings":
            if embeds is None:
                embeds = module.get_input_embeddings()(kwargs.pop("input_ids"))
            kwargs["inputs_embeds"] = torch.cat([encoder(batch).to(embeds.dtype), embeds], dim=1)
            kwargs.pop("input_ids", None)
            state["strip"] = True
        else:
            cache = kwargs.get("past_key_values")
            if cache is None:
                cache = DynamicCache(config=config)
            dtype = module.get_input_embeddings().weight.dtype  # a bf16 model gets a bf16 prefix
            for layer, (k, v) in enumerate(encoder(batch)):
                cache.update(k.to(dtype), v.to(dtype), layer)
            kwargs["past_key_values"] = cache
        return args, kwargs

    def after(module, args, kwargs, output):
        if state["strip"]:
            output.last_hidden_state = output.last_hidden_state[:, n:]
            state["strip"] = False
        return output

    encoder._hooks = (body.register_forward_pre_hook(before, with_kwargs=True),
                      body.register_forward_hook(after, with_kwargs=True))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Take the virtual tokens off again: the plain base model."""
    for h in model.prompt_encoder._hooks:
        h.remove()
    del model.prompt_encoder
    return model


def sample_vocab(model: nn.Module, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n token ids drawn from the first 5,000 of the vocabulary (Lester et al.: common tokens init best)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, min(vocab, 5000), (n,), generator=generator)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained table (PEFT's `prompt_embeddings`: embeddings, or the flattened prefix)."""
    return {"prompt_embeddings": model.prompt_encoder.table()}


def merge_and_unload(model: nn.Module) -> nn.Module:
    if hasattr(model, "prompt_encoder"):
        raise ValueError("virtual tokens live outside the weights and cannot be merged into them; "
                         "load the run directory itself (unitune generate/chat/eval RUN)")
    return model


PACKING = False
KEY_PREFIX = ""  # PEFT saves prompt-learning tables as plain `prompt_embeddings`
