"""IA3 against PEFT: same outputs given the same vectors, adapters loadable both ways, exact merge."""
import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from unitune.methods import ia3, io

X = torch.randint(3, 300, (2, 17))


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _randomize(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("fixture,targets,ff", [("tiny_llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                                                ("tiny_gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"])])
def test_ia3_matches_peft_both_ways(request, tmp_path, fixture, targets, ff):
    path = request.getfixturevalue(fixture)
    cfg = ia3.Config(target_modules=targets, feedforward_modules=ff)
    ours = _randomize(ia3.apply(_load(path), cfg))
    io.save_adapter(ours, tmp_path / "ours", cfg, str(path))
    theirs = PeftModel.from_pretrained(_load(path), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(X).logits, theirs(X).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(X).logits, _load(path)(X).logits, atol=1e-3)

    peft_model = _randomize(get_peft_model(_load(path), IA3Config(target_modules=targets, feedforward_modules=ff)))
    peft_model.save_pretrained(tmp_path / "peft")
    back = io.load_adapter(_load(path), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, peft_model(X).logits, atol=1e-5, rtol=1e-5)
        merged = io.merge_and_unload(back)
        assert not ia3.layers(merged)
        torch.testing.assert_close(merged(X).logits, peft_model(X).logits, atol=1e-5, rtol=1e-5)


def test_only_the_vectors_train(tiny_llama):
    model = ia3.apply(_load(tiny_llama), ia3.Config())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("ia3_l") for n in trainable)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X, labels=X).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
