"""Bottleneck adapters: identity at init, only adapter weights train, placed right on decoder and encoder stacks."""
import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel

from unitune.methods import adapter, io

X = torch.randint(3, 300, (2, 17))


def _load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()


def _out(model):
    out = model(X)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("variant,fixture,count", [
    ("houlsby", "tiny_llama", 4), ("pfeiffer", "tiny_llama", 2), ("parallel", "tiny_llama", 2),
    ("houlsby", "tiny_gpt2", 4), ("parallel", "tiny_gpt2", 2), ("houlsby", "bert", 4), ("pfeiffer", "bert", 2)])
def test_starts_at_the_base_and_trains_only_the_adapters(request, variant, fixture, count):
    make = _bert if fixture == "bert" else (lambda: _load(request.getfixturevalue(fixture)))
    base, model = make(), adapter.apply(make(), adapter.Config(variant=variant, reduction_factor=4, non_linearity="gelu"))
    layers = adapter.adapter_layers(model)
    assert len(layers) == count
    if variant == "houlsby":
        assert sum("attn" in n or "attention" in n for n, _ in layers) == count // 2
    with torch.no_grad():
        torch.testing.assert_close(_out(model), _out(base))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: the first moves only `up` (it starts at zero), the second `down` too
        opt.zero_grad()
        out = _out(model)  # a random projection: LayerNorm'd outputs have a constant mean square
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).mean().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n for n in changed) and any(".down." in n for n in changed)
    with torch.no_grad():
        assert not torch.allclose(_out(model), _out(base), atol=1e-4)


def test_parallel_on_bert_explains_and_save_load_round_trip(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="use houlsby or pfeiffer"):
        adapter.apply(_bert(), adapter.Config(variant="parallel"))
    cfg = adapter.Config(variant="houlsby", reduction_factor=4)
    model = adapter.apply(_load(tiny_llama), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    io.save_adapter(model, tmp_path / "a", cfg, str(tiny_llama))
    back = io.load_adapter(_load(tiny_llama), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, model(X).logits)
    with pytest.raises(ValueError, match="cannot be merged"):
        io.merge_and_unload(back)
