"""Selective methods: a gradient step changes exactly the parameters the method picks."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from unitune.methods import bitfit, layernorm, partial

X = torch.randint(3, 300, (2, 17))


def _step_changes(model) -> set[str]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(X, labels=X).loss.backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    for m in model.modules():  # deterministic: GPT-2's dropout off
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_bitfit_trains_biases_only(tiny_gpt2, tiny_llama):
    changed = _step_changes(bitfit.apply(_load(tiny_gpt2), bitfit.Config()))
    assert changed and all(n.endswith(".bias") for n in changed)
    assert len(changed) == sum(n.endswith(".bias") for n, _ in _load(tiny_gpt2).named_parameters())
    with pytest.raises(ValueError, match="no bias terms"):
        bitfit.apply(_load(tiny_llama), bitfit.Config())


def test_layernorm_tuning_trains_norms_only(tiny_llama):
    changed = _step_changes(layernorm.apply(_load(tiny_llama), layernorm.Config()))
    assert changed == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                       "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                       "model.norm.weight"}


def test_partial_freezing_trains_last_blocks_and_named_modules(tiny_llama, tiny_gpt2):
    changed = _step_changes(partial.apply(_load(tiny_llama), partial.Config(last_n_blocks=1, modules=["norm"])))
    assert changed and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in changed)
    assert "model.norm.weight" in changed and not any(n.startswith("model.layers.0.") for n in changed)
    gpt2 = _step_changes(partial.apply(_load(tiny_gpt2), partial.Config(last_n_blocks=2)))
    assert gpt2 and all(n.startswith("transformer.h.") for n in gpt2)
    with pytest.raises(ValueError, match="has 2 blocks"):
        partial.apply(_load(tiny_llama), partial.Config(last_n_blocks=5))
    with pytest.raises(ValueError, match="nothing to train"):
        partial.apply(_load(tiny_llama), partial.Config())
