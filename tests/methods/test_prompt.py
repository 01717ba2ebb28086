"""Prompt tuning, P-tuning and prefix tuning against PEFT, with KV-cache generation and packing refused."""
import copy

import pytest
import torch
from peft import (PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model)
from transformers import AutoModelForCausalLM, AutoTokenizer

from unitune.config import RecipeError, load_recipe
from unitune.generation import _encode, _settings
from unitune.models.loader import end_of_turn_ids
from unitune.methods import io, prefix, prompt, ptuning, virtual

N = 5
X = torch.randint(3, 300, (2, 17))
MASK = torch.ones_like(X)
MASK[1, :4] = 0  # one left-padded row


def _load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


CASES = {
    "prompt": (prompt, prompt.Config(num_virtual_tokens=N, init="random"),
               PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "ptuning": (ptuning, ptuning.Config(num_virtual_tokens=N, encoder_hidden_size=16),
                PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16)),
    "prefix": (prefix, prefix.Config(num_virtual_tokens=N, init="random"),
               PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "prefix-projection": (prefix, prefix.Config(num_virtual_tokens=N, projection=True, encoder_hidden_size=16),
                          PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                             encoder_hidden_size=16)),
}


def _copy_into_peft(ours, theirs):
    """Give PEFT's prompt encoder our encoder's weights (the same module layout by design)."""
    mine = ours.prompt_encoder.state_dict()
    target = theirs.prompt_encoder["default"]
    missing, unexpected = target.load_state_dict(mine, strict=False)
    assert not unexpected and all("lstm" in k for k in missing), (missing, unexpected)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_same_outputs_as_peft_and_adapters_load_both_ways(request, tmp_path, case, fixture):
    path = request.getfixturevalue(fixture)
    method, cfg, peft_cfg = CASES[case]
    ours = method.apply(_load(path), cfg)
    with torch.no_grad():
        for p in ours.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    theirs = get_peft_model(_load(path), copy.deepcopy(peft_cfg)).eval()  # PEFT fills in the config it is given
    _copy_into_peft(ours, theirs)
    skip = N if method is not prefix else 0  # PEFT returns logits for the virtual tokens too
    with torch.no_grad():
        tuned = ours(X, attention_mask=torch.ones_like(X)).logits
        torch.testing.assert_close(tuned, theirs(X, attention_mask=torch.ones_like(X)).logits[:, skip:], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(tuned, _load(path)(X).logits, atol=1e-3)
    io.save_adapter(ours, tmp_path / "ours", cfg, str(path))
    loaded = PeftModel.from_pretrained(_load(path), tmp_path / "ours").eval()
    back = io.load_adapter(_load(path), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    from_peft = io.load_adapter(_load(path), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X, attention_mask=torch.ones_like(X)).logits[:, skip:], tuned, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(back(X).logits, tuned, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(from_peft(X).logits, tuned, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_only_the_virtual_tokens_train(tiny_llama, case):
    method, cfg, _ = CASES[case]
    model = method.apply(_load(tiny_llama), cfg)
    model(X, attention_mask=MASK).logits.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.requires_grad == n.startswith("prompt_encoder.")
        assert (p.grad is not None and p.grad.abs().sum() > 0) == n.startswith("prompt_encoder."), n


@pytest.mark.parametrize("case", ["prompt", "prefix"])
def test_kv_cache_generation_matches_full_recomputation(tiny_llama, case):
    """Greedy decoding with the cache equals re-running the whole sequence each step; batched == alone."""
    method, cfg, _ = CASES[case]
    base = _load(tiny_llama)
    with torch.no_grad():  # at init scale greedy decoding repeats one token; larger weights make it vary
        for n, p in base.named_parameters():
            if "norm" not in n:
                p.mul_(10)
    model = method.apply(base, cfg)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.mul_(0.2)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    convs = [[{"role": "user", "content": "Two lamps for Ana in Lima."}], [{"role": "user", "content": "Hi"}]]
    # A random model may end its answer at once; with the stop tokens barred for all T steps every
    # comparison below covers T real tokens.
    T, stops = 16, end_of_turn_ids(tok)
    settings = {**_settings(tok, T, 0.0, 1.0), "min_new_tokens": T}

    def cached(batch):
        enc = _encode(tok, batch, "cpu")
        with torch.no_grad():
            return model.generate(**enc, **settings)[:, enc["input_ids"].shape[1]:]

    batched = cached(convs)
    assert batched.shape == (2, T)
    for i, conv in enumerate(convs):
        alone = cached([conv])[0]
        torch.testing.assert_close(batched[i], alone, rtol=0, atol=0)  # left padding changes nothing
        ids = _encode(tok, [conv], "cpu")["input_ids"]
        with torch.no_grad():
            for _ in range(T):  # no cache: the whole sequence each step
                logits = model(ids, use_cache=False).logits[:, -1]
                logits[:, stops] = -torch.inf
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        torch.testing.assert_close(ids[0, -T:], alone, rtol=0, atol=0)
        assert len(set(alone.tolist())) > T // 2 and tok.decode(alone, skip_special_tokens=True).strip()
    virtual.detach(model)
    assert not hasattr(model, "prompt_encoder")


def test_packing_is_refused_and_a_prompt_run_trains(tiny_recipe):
    import unitune

    tiny_recipe["method"] = {"name": "prompt", "num_virtual_tokens": 4}
    with pytest.raises(RecipeError, match="data.packing=false"):
        load_recipe(tiny_recipe)
    tiny_recipe["data"]["packing"] = False
    tiny_recipe["method"] = {"name": "prompt", "num_virtual_tokens": 4, "init": "text", "init_text": "Extract JSON"}
    run = unitune.train(tiny_recipe)
    assert run.metrics["val_loss"] < run.before["val_loss"]
    assert (run.output / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match="cannot be merged"):
        unitune.merge(run.dir)
