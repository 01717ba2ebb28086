"""Assistant masks on the real chat templates of the families unitune claims, checked token by token.

The templates are the models' own (tests/data/templates/*.jinja, source in each file's first line); the
tokenizer is the tiny test BPE with each family's special tokens added, so every marker is one token.
"""
import copy
from pathlib import Path

import pytest

from unitune.data.files import DataError
from unitune.data.formats import Sample
from unitune.data.templates import render
from unitune.data.tokenize import IGNORE, tokenize_sample

TEMPLATES = Path(__file__).parent / "templates"

# family -> (special tokens as the model's tokenizer has them, the token that closes an assistant turn)
FAMILIES = {
    "llama-3.2-instruct": (dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"]), "<|eot_id|>"),
    "qwen2.5-instruct": (dict(eos_token="<|im_end|>"), "<|im_end|>"),
    "qwen3": (dict(eos_token="<|im_end|>"), "<|im_end|>"),
    "gemma-3-it": (dict(bos_token="<bos>", eos_token="<eos>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"]),
                   "<end_of_turn>"),
    "mistral-nemo-instruct-2407": (dict(bos_token="<s>", eos_token="</s>", additional_special_tokens=["[INST]", "[/INST]"]),
                                   "</s>"),
    "phi-3.5-mini-instruct": (dict(eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]), "<|end|>"),
    "smollm2-instruct": (dict(bos_token="<|im_start|>", eos_token="<|im_end|>"), "<|im_end|>"),
    "zephyr-7b-beta": (dict(bos_token="<s>", eos_token="</s>"), "</s>"),
}

PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "Four."}, {"role": "user", "content": "Times 3?"},
         {"role": "assistant", "content": "Twelve, since 4 x 3 = 12."}, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "Six, of course."}]
# The same with reasoning: Qwen3 keeps it only in the final turn; other templates write it as text.
THINKING = [dict(m, content=f"<think>\nStep {i}: think it through.\n</think>\n\n{m['content']}") if m["role"] == "assistant"
            else m for i, m in enumerate(PLAIN)]


@pytest.fixture(scope="module")
def family_tokenizers(tokenizer):
    out = {}
    for name, (specials, _) in FAMILIES.items():
        tok = copy.deepcopy(tokenizer)
        tok.add_special_tokens(specials)
        tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
        out[name] = tok
    return out


def learned_runs(tok, ex) -> list[str]:
    """The text of each run of consecutive tokens that carry loss."""
    positions = [t + 1 for t, y in enumerate(ex.targets) if y != IGNORE]
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return [tok.decode([ex.input_ids[p] for p in run]) for run in runs]


def expected_runs(name: str, conv: list[dict]) -> list[str]:
    """What each assistant turn should teach, written from the template's rules, not from unitune's code."""
    end = FAMILIES[name][1]
    turns = [m["content"] for m in conv if m["role"] == "assistant"]
    if name == "qwen3":  # reasoning survives in the final turn only, and that turn always opens a think block
        answers = [t.split("</think>")[-1].lstrip("\n") for t in turns]
        reasoning = turns[-1].split("</think>")[0].split("<think>")[-1].strip("\n") if "</think>" in turns[-1] else ""
        turns = answers[:-1] + [f"<think>\n{reasoning}\n</think>\n\n{answers[-1]}"]
    return [t + end for t in turns]


@pytest.mark.parametrize("conv", [PLAIN, THINKING], ids=["plain", "thinking"])
@pytest.mark.parametrize("name", FAMILIES)
def test_mask_is_exactly_each_answer_and_its_end_token(family_tokenizers, name, conv):
    tok = family_tokenizers[name]
    ex = tokenize_sample(tok, Sample(conv, None, "x:1"), 1024, "assistant")
    # Each run is one assistant turn, token for token: no header, no user or system text, no newline
    # after the end-of-turn token, and no turn missing.
    assert learned_runs(tok, ex) == expected_runs(name, conv)
    assert tok.decode(ex.input_ids) == render(tok, conv)  # the ids are the template's own text


def test_these_templates_defeat_prefix_rendering(family_tokenizers):
    """Qwen3 and Mistral Nemo are the cases the former prefix-diff mask got wrong: keep them covered."""
    qwen, nemo = family_tokenizers["qwen3"], family_tokenizers["mistral-nemo-instruct-2407"]
    # Qwen3 renders turn 2 with its reasoning while it is last, without it once a user message follows.
    assert not render(qwen, THINKING).startswith(render(qwen, THINKING[:3]))
    # Mistral Nemo moves the system prompt into whichever user turn it renders last.
    assert not render(nemo, PLAIN).startswith(render(nemo, PLAIN[:2], add_generation_prompt=True))


def test_qwen3_history_drops_earlier_reasoning(family_tokenizers):
    tok = family_tokenizers["qwen3"]
    ex = tokenize_sample(tok, Sample(THINKING, None, "x:1"), 1024, "assistant")
    text = tok.decode(ex.input_ids)
    # What is learned is what the model sees at inference: earlier reasoning is gone from the history.
    assert "Step 2:" not in text and "Step 4:" not in text and "Step 6:" in text


def test_prompt_truncation_keeps_bos_and_the_final_answer(family_tokenizers):
    tok = family_tokenizers["llama-3.2-instruct"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    full = tokenize_sample(tok, Sample(PLAIN, None, "x:1"), 1024, "assistant")
    ex = tokenize_sample(tok, Sample(PLAIN, None, "x:1"), 24, "assistant")
    assert ex.truncated and len(ex.input_ids) == 24 and len(full.input_ids) > 24
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1:] == full.input_ids[-23:]  # the oldest went
    assert ex.input_ids[-1] == eot and ex.targets[-2] == eot  # the last thing learned is to stop
    assert learned_runs(tok, ex)[-1] == "Six, of course.<|eot_id|>"


def test_prompt_truncation_cuts_a_bos_that_opens_every_turn(family_tokenizers):
    tok = family_tokenizers["smollm2-instruct"]  # its BOS is <|im_start|>, as in the real tokenizer
    full = tokenize_sample(tok, Sample(PLAIN, None, "x:1"), 1024, "assistant")
    ex = tokenize_sample(tok, Sample(PLAIN, None, "x:1"), 24, "assistant")
    assert ex.input_ids == full.input_ids[-25:-1]  # a plain window, ending at the final <|im_end|>
    assert learned_runs(tok, ex)[-1] == "Six, of course.<|im_end|>"


def test_a_leading_assistant_message_is_context(family_tokenizers):
    tok = family_tokenizers["smollm2-instruct"]
    conv = [{"role": "assistant", "content": "Hello! Ask me anything."}] + PLAIN[1:3]
    ex = tokenize_sample(tok, Sample(conv, None, "x:1"), 1024, "assistant")
    assert learned_runs(tok, ex) == ["Four.<|im_end|>"]


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + CONTENT + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template, conv, error", [
    # The answer contains the end-of-turn marker: the turn would end inside it.
    (CHATML.replace("CONTENT", "m['content']"),
     PLAIN[:2] + [{"role": "assistant", "content": "Four.<|im_end|> More."}], "does not end with the message's text"),
    # The template rewrites assistant text.
    (CHATML.replace("CONTENT", "(m['content'] | upper if m['role'] == 'assistant' else m['content'])"),
     PLAIN[:3], "does not end with the message's text"),
    # Nothing closes an assistant turn: the model could not learn to stop.
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}", PLAIN[:3], "no end-of-turn token"),
    # The last message rendered is written differently from the same message followed by others.
    (CHATML.replace("CONTENT", "(m['content'] | upper if loop.last else m['content'])"),
     PLAIN[:3], "where the turn starts is unknown"),
])
def test_a_turn_that_cannot_be_located_exactly_is_refused(tokenizer, template, conv, error):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(DataError, match=rf"^data.jsonl:3: message 2 \(assistant\): .*{error}"):
        tokenize_sample(tok, Sample(conv, None, "data.jsonl:3"), 1024, "assistant")
