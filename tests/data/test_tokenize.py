"""The assistant mask must be right for any chat template, without {% generation %} tags."""
import pytest

from unitune.data.formats import Sample
from unitune.data.tokenize import IGNORE, assistant_spans, tokenize_sample

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
