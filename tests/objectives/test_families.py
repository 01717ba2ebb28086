"""The SFT loss is the model's own loss, and packed rows give each example its own logits, on
every family unitune supports: tiny random models built from configs (2 layers, hidden 32).

Post-processing fields are set far from their defaults (softcap 0.5, scales 4) and the weights
drawn larger than usual (initializer_range 0.2), so that logits are large enough for a missing
softcap or scale to show in the loss.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from unitune.data.packing import collate, packs_exactly
from unitune.data.tokenize import IGNORE, Example
from unitune.models import heads
from unitune.objectives import logprobs, sft

VOCAB = 96
ATTENTION = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
SLIDING = dict(sliding_window=4)  # shorter than the examples, so the sliding layers' masks matter
FAMILIES = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {}),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config, dict(head_dim=8)),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config, dict(head_dim=8, final_logit_softcapping=0.5, **SLIDING)),
    "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, dict(head_dim=8, final_logit_softcapping=0.5, **SLIDING)),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, SLIDING),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, {}),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config, None),
    "granite": (tf.GraniteForCausalLM, tf.GraniteConfig, dict(logits_scaling=0.25)),
    "cohere": (tf.CohereForCausalLM, tf.CohereConfig, dict(logit_scale=4.0)),
}
POSTPROCESSED = ["gemma2", "gemma3", "granite", "cohere"]


def build(family: str) -> torch.nn.Module:
    model_cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    if extra is None:  # GPT-2 names its sizes its own way
        config = config_cls(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                            bos_token_id=1, eos_token_id=2)
    else:
        config = config_cls(**ATTENTION, **extra)
    return model_cls(config).eval()  # eval: GPT-2's dropout would make two forwards differ


def examples(lengths: list[int], prompt: int = 3) -> list[Example]:
    """Chat-like examples: the first `prompt` tokens and the last position carry no loss."""
    g = torch.Generator().manual_seed(sum(lengths))
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        targets = [IGNORE] * prompt + ids[prompt + 1:] + [IGNORE]
        out.append(Example(ids, targets, truncated=False, where="test"))
    return out


def reference(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' own mean loss on the same tokens, and its gradients."""
    labels = torch.full_like(batch["targets"], IGNORE)
    labels[:, 1:] = batch["targets"][:, :-1]  # the model shifts labels itself; our targets come shifted
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_and_gradients_are_the_models(family, monkeypatch):
    model = build(family)
    batch = collate(examples([11, 7]), [[0], [1]], pad_id=0, packed=False)  # two rows, the second padded
    n = int((batch["targets"] != IGNORE).sum())
    want, want_grads = reference(model, batch)

    with torch.no_grad():
        whole, info = sft.loss(model, batch, sft.Config(loss_chunk=1024))
    assert sft.count(batch) == n
    torch.testing.assert_close(whole / n, want, atol=1e-5, rtol=1e-5)

    recomputed = []  # the chunked branch recomputes each chunk's logits in backward
    real = logprobs.checkpoint
    monkeypatch.setattr(logprobs, "checkpoint", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    model.zero_grad()
    chunked, _ = sft.loss(model, batch, sft.Config(loss_chunk=3))
    (chunked / n).backward()
    assert len(recomputed) == -(-n // 3) > 1
    torch.testing.assert_close(chunked.detach() / n, want, atol=1e-5, rtol=1e-5)
    for (name, p), g in zip(model.named_parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{family} {name}: {m}")


@pytest.mark.parametrize("family", POSTPROCESSED)
def test_a_family_whose_postprocessing_is_unknown_is_refused(family, monkeypatch):
    """Without its rule the loss would be wrong: the probe against the model's forward refuses it."""
    monkeypatch.setattr(heads, "POSTPROCESS", {})
    batch = collate(examples([9]), [[0]], pad_id=0, packed=False)
    with pytest.raises(ValueError, match=f"logits of {type(build(family)).__name__}.*POSTPROCESS"):
        sft.loss(build(family), batch, sft.Config())


def test_a_new_kind_of_postprocessing_is_refused():
    """A family transformers adds later with logits scaled some new way is caught, not trained wrongly."""
    class Tempered(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 0.7
            return out

    torch.manual_seed(0)
    model = Tempered(tf.LlamaConfig(**ATTENTION)).eval()
    with pytest.raises(ValueError, match="Tempered"):
        heads.verify(model)
    heads.verify(build("llama"))  # the plain family passes the same probe


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_match_separate_logits(family):
    model = build(family)
    exs = examples([6, 9, 5])
    packed = collate(exs, [[0, 1, 2]], pad_id=0, packed=True)
    assert packs_exactly(model) is True
    with torch.no_grad():
        joint = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for ex in exs:
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(joint[start:start + len(ex.input_ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(ex.input_ids)
