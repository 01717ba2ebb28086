"""LoRA adapters beyond the plain case move between PEFT 0.21 and unitune with the same numbers:
per-module ranks and alphas, modules trained in full, a subset of layers, and the base they name."""
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from unitune import api
from unitune.config import RecipeError
from unitune.methods import io, lora, method_config
from unitune.methods.lora import Config
from unitune.methods.targets import pattern_value
from unitune.models import builtin

X = torch.randint(3, 300, (2, 17))
PEFT_PREFIX = "base_model.model."
PATTERNS = {"rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6},
            "alpha_pattern": {r"layers\.1\..*v_proj": 3.0, "q_proj": 5.0}}


def _load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _classifier(path):
    torch.manual_seed(0)  # the new head's init: the same in every copy
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()


def _randomize(model):
    """LoRA B starts at zero and a trained copy equals its original: give them values that show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or ".modules_to_save." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _peft_layers(peft_model) -> dict[str, tuple[int, float]]:
    """{module name in the base model: (rank, scaling)} of PEFT's LoRA layers."""
    return {n.removeprefix(PEFT_PREFIX): (m.r["default"], m.scaling["default"])
            for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _our_layers(model) -> dict[str, tuple[int, float]]:
    return {n: (m.state("default")["lora_A.weight"].shape[0], m.scaling["default"]) for n, m in lora.lora_layers(model)}


def _same_logits(a, b):
    with torch.no_grad():
        torch.testing.assert_close(a(X).logits, b(X).logits, atol=1e-5, rtol=1e-5)


def test_pattern_keys_are_matched_as_peft_matches_them(tiny_llama):
    keys = ["q_proj", "proj", r"layers\.0\.self_attn\.q_proj", r"layers\.\d\.mlp\..*", "self_attn.v_proj",
            "0.self_attn.k_proj", "mlp"]
    names = [n for n, _ in _load(tiny_llama).named_modules() if n]
    for name in names:  # PEFT gives the name itself back when no key matches
        assert pattern_value({k: k for k in keys}, name, name) == get_pattern_key(keys, name), name
    assert pattern_value({"proj": 1}, "model.layers.0.self_attn.q_proj", 0) == 0  # a suffix at a '.' only


def test_peft_rank_and_alpha_patterns_load_with_the_same_logits(tiny_llama, tmp_path):
    peft_model = get_peft_model(_load(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                              **PATTERNS))
    _randomize(peft_model).save_pretrained(tmp_path / "peft")
    ours = io.load_adapter(_load(tiny_llama), tmp_path / "peft")
    theirs = _peft_layers(peft_model)
    assert _our_layers(ours) == theirs
    assert {r for r, _ in theirs.values()} == {2, 4, 6} and len({s for _, s in theirs.values()}) == 5
    _same_logits(ours, peft_model)


def test_recipe_patterns_save_for_peft(tiny_llama, tmp_path):
    cfg = method_config({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                         "rslora": True, **PATTERNS})
    ours = _randomize(lora.apply(_load(tiny_llama), cfg))
    io.save_adapter(ours, tmp_path / "ours", cfg, str(tiny_llama))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == PATTERNS["rank_pattern"] and saved["alpha_pattern"] == PATTERNS["alpha_pattern"]
    assert saved["target_modules"] == ["down_proj", "q_proj", "v_proj"]  # every such layer: leaf names, as vLLM reads
    theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "ours").eval()
    assert _peft_layers(theirs) == _our_layers(ours)
    assert len({r for r, _ in _our_layers(ours).values()}) == 3
    _same_logits(ours, theirs)
    with pytest.raises(RecipeError, match=r"method\.rank_pattern.*not a regular expression"):
        method_config({"name": "lora", "rank_pattern": {"q_proj(": 2}})
    with pytest.raises(RecipeError, match="layers_to_transform needs target_modules as a list"):
        method_config({"name": "lora", "target_modules": ".*q_proj", "layers_to_transform": [0]})


def test_modules_to_save_classifier_head_both_ways(tiny_llama, tmp_path):
    # PEFT -> unitune: a SEQ_CLS adapter, whose `score` head PEFT adds to modules_to_save itself
    peft_model = _randomize(get_peft_model(_classifier(tiny_llama),
                                           LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"])))
    peft_model.save_pretrained(tmp_path / "peft")
    assert "score" in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]
    back = io.load_adapter(_classifier(tiny_llama), tmp_path / "peft")
    assert isinstance(back.score, lora.ModuleToSave)
    _same_logits(back, peft_model.eval())

    # unitune -> PEFT: the head trains in full beside LoRA, its original kept frozen
    cfg = Config(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    ours = lora.apply(_classifier(tiny_llama), cfg)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {"score.modules_to_save.default.weight"} == {n for n in trainable if "lora_" not in n}
    assert not ours.score.original_module.weight.requires_grad
    _randomize(ours)
    io.save_adapter(ours, tmp_path / "ours", cfg, str(tiny_llama))
    theirs = PeftModel.from_pretrained(_classifier(tiny_llama), tmp_path / "ours").eval()
    _same_logits(ours, theirs)
    with torch.no_grad():
        tuned, base = ours(X).logits, _classifier(tiny_llama)(X).logits
        with lora.disabled(ours):  # the frozen original head comes back with the base
            torch.testing.assert_close(ours(X).logits, base)
        assert not torch.allclose(tuned, base, atol=1e-3)
        torch.testing.assert_close(lora.merge_and_unload(ours)(X).logits, tuned, atol=1e-5, rtol=1e-5)
    assert isinstance(ours.score, torch.nn.Linear)


def test_tied_head_in_modules_to_save_beside_embedding_lora(tiny_llama, tmp_path):
    """tiny_llama ties lm_head to embed_tokens: the trained head is an untied copy in both tools, and PEFT's
    saved embedding base layer still loads."""
    targets = ["embed_tokens", "q_proj"]
    peft_model = _randomize(get_peft_model(_load(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                         modules_to_save=["lm_head"]))).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    _same_logits(io.load_adapter(_load(tiny_llama), tmp_path / "peft"), peft_model)

    cfg = Config(r=4, alpha=8, target_modules=targets, modules_to_save=["lm_head"])
    ours = _randomize(lora.apply(_load(tiny_llama), cfg))
    io.save_adapter(ours, tmp_path / "ours", cfg, str(tiny_llama))
    _same_logits(ours, PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "ours").eval())
    with torch.no_grad():
        tuned = ours(X).logits
    lora.merge_and_unload(ours).save_pretrained(tmp_path / "merged")  # saved untied, or the head would revert
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "merged")(X).logits, tuned, atol=1e-5, rtol=1e-5)


SUBSETS = [{"target_modules": r".*\.layers\.1\.self_attn\.(q|v)_proj"},
           {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0]},
           {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*\.0\.mlp\.down_proj"}]


@pytest.mark.parametrize("subset", SUBSETS, ids=["regex", "layers_to_transform", "exclude_modules"])
def test_a_subset_of_layers_reloads_to_the_same_modules(tiny_llama, tmp_path, subset):
    ours = _randomize(lora.apply(_load(tiny_llama), Config(r=4, alpha=8, **subset)))
    names = set(_our_layers(ours))
    assert 0 < len(names) < 4
    # the same config picks the same modules in PEFT, and its saved adapter loads here
    peft_model = _randomize(get_peft_model(_load(tiny_llama), LoraConfig(r=4, lora_alpha=8, **subset))).eval()
    assert set(_peft_layers(peft_model)) == names
    peft_model.save_pretrained(tmp_path / "peft")
    back = io.load_adapter(_load(tiny_llama), tmp_path / "peft")
    assert set(_our_layers(back)) == names
    _same_logits(back, peft_model)
    # ours saves a target_modules pattern that both tools reload to exactly these modules
    io.save_adapter(ours, tmp_path / "ours", Config(r=4, alpha=8, **subset), str(tiny_llama))
    assert isinstance(json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"], str)
    theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "ours").eval()
    assert set(_peft_layers(theirs)) == names
    assert set(_our_layers(io.load_adapter(_load(tiny_llama), tmp_path / "ours"))) == names
    _same_logits(ours, theirs)


def test_builtin_base_names_the_hub_id_and_a_trained_run_reloads(tiny_recipe, tiny_llama, monkeypatch):
    """A run on a built-in model saves the hub id for PEFT users and its own source in unitune.json;
    the recipe trains with rank/alpha patterns, a head in full and a layer subset, and PEFT reads the result."""
    find_spec = builtin.importlib.util.find_spec
    monkeypatch.setitem(builtin.BUILTINS, "tiny-builtin", builtin.Builtin("tiny_pkg", "pip install tiny-pkg", "",
                                                                        hub_id="example-org/tiny"))
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: SimpleNamespace(
        origin=str(tiny_llama / "__init__.py")) if name == "tiny_pkg" else find_spec(name))
    recipe = {**tiny_recipe, "model": {"name": "tiny-builtin"}, "eval": {"generate": 0},
              "train": {**tiny_recipe["train"], "steps": 3}}
    recipe["method"] = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                        "layers_to_transform": [1], "modules_to_save": ["lm_head"], **PATTERNS}
    out = api.train(recipe).output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "example-org/tiny"
    assert json.loads((out / io.OWN_FILE).read_text()) == {"base_model": "tiny-builtin"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reads the config without a word
        assert PeftConfig.from_pretrained(out).base_model_name_or_path == "example-org/tiny"

    ours = api.load_run_or_model(out).model.eval()  # a bare adapter directory: the base comes from unitune.json
    theirs = PeftModel.from_pretrained(_load(tiny_llama), out).eval()
    assert set(_peft_layers(theirs)) == set(_our_layers(ours)) == {
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"}
    assert _peft_layers(theirs) == _our_layers(ours)
    head = ours.lm_head
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)  # it trained
    _same_logits(ours, theirs)


def test_builtin_name_from_its_name_or_its_weights_file(monkeypatch, tmp_path):
    smollm = builtin.BUILTINS["smollm2-135m-instruct"]
    assert smollm.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    find_spec = builtin.importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: SimpleNamespace(
        origin=str(tmp_path / "__init__.py")) if name == smollm.package else find_spec(name))
    assert builtin.builtin_name(tmp_path / smollm.file) == "smollm2-135m-instruct"  # what load_model records
    assert builtin.builtin_name("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert builtin.builtin_name(tmp_path / "other.gguf") is None
