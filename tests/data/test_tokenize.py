"""The assistant mask must be right for any chat template, without {% generation %} tags; rows over
max_length are cut as data.truncation says. Real templates: test_templates.py."""
import json

import pytest

from unitune.config import DataConfig
from unitune.data import build_data
from unitune.data.formats import Sample
from unitune.data.templates import assistant_spans
from unitune.data.tokenize import IGNORE, tokenize_sample
from unitune.objectives import sft

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six, of course."}]

TEMPLATES = {
    "chatml": None,
    "llama3": ("{{ '<|endoftext|>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content'] | trim + '<|im_end|>' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"),
    "zephyr": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|endoftext|>' + '\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    # Gemma folds the system prompt into the first user turn and calls the assistant "model".
    "gemma": ("{% set sys = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
              "{% for m in messages if m['role'] != 'system' %}{{ '<|im_start|>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
              "{{ (sys if loop.first else '') + m['content'] + '<|im_end|>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}"),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_loss_only_on_assistant_turns(tokenizer, name):
    tok = tokenizer
    saved = tok.chat_template
    if TEMPLATES[name]:
        tok.chat_template = TEMPLATES[name]
    try:
        ex = tokenize_sample(tok, Sample(CONV, None, "x:1"), 512, "assistant")
        text, spans = assistant_spans(tok, CONV)
    finally:
        tok.chat_template = saved
    learned = [t for t in ex.targets if t != IGNORE]
    decoded = tok.decode(learned)
    # Both answers and the end-of-turn marker after each are learned, and nothing of the prompts.
    assert "Four." in decoded and "Six, of course." in decoded
    assert "What is" not in decoded and "Be brief" not in decoded and "And 3+3" not in decoded
    assert len(spans) == 2 and all(text[s:e].lstrip().startswith(("Four", "Six")) for s, e in spans)
    end = "<|endoftext|>" if name == "zephyr" else "<|im_end|>"
    assert decoded.count(end) == 2


def test_targets_are_shifted_inputs(tokenizer):
    ex = tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), 512, "all")
    assert ex.targets[:-1] == ex.input_ids[1:] and ex.targets[-1] == IGNORE


def test_plain_text_ends_with_eos(tokenizer):
    ex = tokenize_sample(tokenizer, Sample(None, "hello world", "x:1"), 512, "assistant")
    assert ex.input_ids[-1] == tokenizer.eos_token_id and ex.n_loss == len(ex.input_ids) - 1


def test_template_errors_name_the_row(tokenizer):
    from unitune.data.files import DataError

    saved = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                               "{{ raise_exception('roles must be user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")
    try:
        with pytest.raises(DataError, match=r"data.jsonl:7: the chat template cannot render.*roles must be"):
            tokenize_sample(tokenizer, Sample(CONV, None, "data.jsonl:7"), 512, "assistant")
    finally:
        tokenizer.chat_template = saved


def test_default_template_ends_turns_with_eos(tokenizer):
    from unitune.models.loader import CHATML_TEMPLATE

    text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False, chat_template=CHATML_TEMPLATE)
    assert text == f"<|im_start|>user\na{tokenizer.eos_token}\n"


def test_prompt_truncation_keeps_the_answer_and_its_end_token(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    full = tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), 512, "assistant")
    assert full.input_ids[-1] != eot  # ChatML writes a newline after the end-of-turn token
    answer = len(tokenizer("Six, of course.<|im_end|>", add_special_tokens=False)["input_ids"])
    n = answer + 3
    ex = tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), n, "assistant")  # prompt is the default
    assert ex.truncated and ex.input_ids == full.input_ids[-n - 1 : -1]  # oldest tokens and the trailing newline went
    assert ex.input_ids[-1] == eot and ex.targets[-2] == eot  # the last thing learned is to stop
    assert tokenizer.decode([t for t in ex.targets if t != IGNORE]) == "Six, of course.<|im_end|>"
    # The answer plus one token to predict its first token from is the least that fits; less drops the row.
    assert tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), answer + 1, "assistant").n_loss == answer
    assert tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), answer, "assistant") is None


def test_drop_and_right_truncation(tokenizer):
    full = tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), 512, "assistant")
    n = len(full.input_ids) - 3
    assert tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), n, "assistant", "drop") is None
    kept = tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), n + 3, "assistant", "drop")
    assert not kept.truncated and kept.input_ids == full.input_ids
    right = tokenize_sample(tokenizer, Sample(CONV, None, "x:1"), n, "assistant", "right")
    assert right.truncated and right.input_ids == full.input_ids[:n] and right.targets[:-1] == full.targets[: n - 1]


def test_plain_text_keeps_its_beginning_unless_dropped(tokenizer):
    doc = Sample(None, "user assistant system " * 10, "x:1")
    full = tokenize_sample(tokenizer, doc, 512, "all")
    for mode in ("prompt", "right"):
        ex = tokenize_sample(tokenizer, doc, 8, "all", mode)
        assert ex.truncated and ex.input_ids == full.input_ids[:8]
    assert tokenize_sample(tokenizer, doc, 8, "all", "drop") is None


@pytest.mark.parametrize("mode, truncated, too_long, no_loss", [("prompt", 1, 1, 0), ("drop", 0, 2, 0), ("right", 2, 0, 1)])
def test_truncation_counts_in_data_stats(tmp_path, tokenizer, mode, truncated, too_long, no_loss):
    rows = [("Hi", "Hello."), ("Hello, how are you? " * 12, "Fine."), ("Hi", "I am fine. " * 12)]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}) + "\n"
                         for u, a in rows))
    data = build_data(DataConfig(train=str(p), max_length=24, truncation=mode), tokenizer, 0, sft.example)
    assert (data.stats["truncated"], data.stats["dropped_too_long"], data.stats["dropped_no_loss_tokens"]) == (
        truncated, too_long, no_loss)
    assert len(data.train) == 3 - too_long - no_loss and all(len(e.input_ids) <= 24 for e in data.train)
