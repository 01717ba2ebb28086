"""Samples -> token ids and next-token targets, with loss only where the recipe wants it.

The assistant mask works with any chat template (FIELD-NOTES trap 2): render the conversation
prefix by prefix, and the characters that `messages[:i+1]` adds over `messages[:i]` + the
generation prompt are assistant turn i. Token offsets map those character spans to tokens.
This needs no `{% generation %}` tags in the template.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from unitune.data.files import DataError
from unitune.data.formats import Sample

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    targets: list[int]  # targets[t] = input_ids[t+1] where that token carries loss, else IGNORE
    truncated: bool
    where: str
    messages: list[dict] | None = None  # kept for generation-based evaluation

    @property
    def n_loss(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = os.path.commonprefix([a[:n], b[:n]])
    return len(i)


def render(tok: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included)."""
    full = render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(render(tok, messages[:i], add_generation_prompt=True), full) if i else 0
        end = _common_prefix(render(tok, messages[: i + 1]), full)
        if end > start:
            spans.append((start, end))
    return full, spans


def _targets(ids: list[int], mask: list[bool]) -> list[int]:
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def tokenize_sample(tok: PreTrainedTokenizerBase, sample: Sample, max_length: int, loss_on: str) -> Example:
    if sample.messages is None:
        ids = tok(sample.text, add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]  # so the model learns where a document ends
        mask = [True] * len(ids)
    else:
        try:
            text, spans = assistant_spans(tok, sample.messages)
        except Exception as err:  # a Jinja error in the template, e.g. an unexpected role or order
            raise DataError(f"{sample.where}: the chat template cannot render this conversation: {err}") from None
        # The template writes BOS etc. itself, so the tokenizer must not add them again.
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if loss_on == "all":
            mask = [True] * len(ids)
        else:
            mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return Example(ids, _targets(ids, mask), truncated, sample.where, sample.messages)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: what to ask, and the answer expected."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
