"""Samples -> token ids and next-token targets, with loss only where the recipe wants it.

The assistant mask comes from the character spans of the assistant turns in the rendered conversation
(unitune/data/templates.py); token offsets map those spans to tokens: a token belongs to the turn its
first character is in.

A row longer than data.max_length is cut as `data.truncation` says:
- prompt (default): keep the final assistant turn whole, with its end-of-turn token, and as much of the
  conversation before it as fits, dropping the oldest tokens (the template's BOS stays first). Cutting
  the end instead teaches the model an answer that never stops. An earlier answer cut at its start keeps
  loss on what is left of it. A row whose final turn alone does not fit (with one token before it to
  predict its first token from) is dropped.
- drop: drop the row.
- right: keep the first max_length tokens.
Plain text rows have no answer to keep: `drop` drops them, the other two keep their beginning.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from unitune.data.files import DataError
from unitune.data.formats import Sample
from unitune.data.templates import assistant_spans

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

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _targets(ids: list[int], mask: list[bool]) -> list[int]:
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def _fit(ids: list[int], mask: list[bool], answer: tuple[int, int] | None, max_length: int,
         truncation: str, bos: int | None) -> tuple[list[int], list[bool]] | None:
    """Cut a row to max_length as `truncation` says (module docstring); None drops it.

    `answer` is the token range [first, end) of the final assistant turn, None for plain text.
    """
    if len(ids) <= max_length:
        return ids, mask
    if truncation == "drop":
        return None
    if truncation == "right" or answer is None:
        return ids[:max_length], mask[:max_length]
    first, end = answer
    # A BOS that opens the text once (Llama, Gemma) stays first: the model always saw it there. One that
    # also opens every turn (SmolLM2's is <|im_start|>) is a turn marker, cut like any other token.
    head = 1 if bos is not None and ids[0] == bos and ids.count(bos) == 1 else 0
    start = max(head, end - (max_length - head))
    if start >= first:
        return None
    return ids[:head] + ids[start:end], mask[:head] + mask[start:end]


def tokenize_sample(tok: PreTrainedTokenizerBase, sample: Sample, max_length: int, loss_on: str,
                    truncation: str = "prompt") -> Example | None:
    """The row as an Example, or None when `truncation` drops it for being longer than max_length."""
    answer = None
    if sample.messages is None:
        ids = tok(sample.text, add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]  # so the model learns where a document ends
        mask = [True] * len(ids)
    else:
        try:
            text, spans = assistant_spans(tok, sample.messages)
        except DataError as err:  # a turn that cannot be located exactly
            raise DataError(f"{sample.where}: {err}") from None
        except Exception as err:  # a Jinja error in the template, e.g. an unexpected role or order
            raise DataError(f"{sample.where}: the chat template cannot render this conversation: {err}") from None
        # The template writes BOS etc. itself, so the tokenizer must not add them again.
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [a for a, _ in enc["offset_mapping"]]
        in_turn = [any(s <= a < e for s, e in spans) for a in starts]
        mask = [True] * len(ids) if loss_on == "all" else in_turn
        if spans:
            last = [t for t, a in enumerate(starts) if spans[-1][0] <= a < spans[-1][1]]
            answer = (last[0], last[-1] + 1)
    fitted = _fit(ids, mask, answer, max_length, truncation, tok.bos_token_id)
    if fitted is None:
        return None
    kept, kept_mask = fitted
    return Example(kept, _targets(kept, kept_mask), len(kept) < len(ids), sample.where, sample.messages)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: what to ask, and the answer expected."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
