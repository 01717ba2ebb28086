"""Preference rows -> token ids: pairs (DPO family, reward models) and unpaired feedback (KTO).

Pair layouts (`to_pair`), as TRL reads them (trl/data_utils.py `maybe_extract_prompt`):
- standard: `prompt`, `chosen`, `rejected` strings. The prompt becomes one user turn and each
  completion one assistant turn, and the chat template applies. TRL tokenises these strings raw,
  without a template; here they read like the instruction format does for SFT, so a standard row gives
  what TRL gives for the same row written as conversations.
- conversational: `prompt` a list of messages ending with a user (or tool) turn, `chosen` and
  `rejected` lists of one assistant message each.
- implicit prompt: `chosen` and `rejected` whole conversations (Anthropic HH). The prompt is the
  longest prefix of whole messages they share; what follows must be one assistant message each.
  A string `prompt` next to such conversations is a copy of the question and is ignored, as TRL does.
- implicit prompt, plain text: `chosen` and `rejected` strings and no `prompt`. The prompt is their
  longest common prefix of characters, a space before the split going to the completions
  (`extract_prompt`); NO chat template applies (the text is taken as written, e.g. HH's
  "\\n\\nHuman: ... \\n\\nAssistant:"), and EOS ends each completion, as TRL's `add_eos`. Two texts
  one of which starts with the other whole are refused (TRL splits them one character early).
An optional numeric `margin` column (reward modelling) rides along. Unpaired rows (`to_unpaired`):
`prompt`, `completion` (strings, or a message list and one assistant message) and `label`; a pair
file serves KTO too, each pair as two unpaired rows (`unpair`), as in TRL.

Tokens (`tokenize_pair`, `tokenize_unpaired`). The prompt is rendered once with the generation prompt,
as the model reads it at inference, and tokenised once for both sides. A completion is the assistant
turn as the template writes it after that prompt (`templates.assistant_spans`: for most templates the
text the whole render adds after the prompt render, Qwen3's empty think block included), cut right
after its end-of-turn token: what generation stops at. TRL keeps the template's tail too (ChatML's
"\\n" after <|im_end|>), teaching a token the model never generates; otherwise the ids are TRL's.
Mistral Nemo drops the system prompt from a conversation that ends with an assistant turn, so its
whole render does not start with the prompt render: the completion is then located after the last
user turn (checked against the message's text) and follows the prompt render, which keeps the system
prompt as at inference; TRL cuts the prompt at the first differing token and trains on the user text.
Prompt and completion are split where the tokenised prompt and prompt+completion part, as TRL does
(`common_prefix_length`): a token that merges across the boundary belongs to the completion.

Truncation, when prompt + the longer completion exceeds max_length (`data.truncation`, as for SFT):
- prompt: cut the prompt from the left (a BOS that opens the text once stays), both completions whole;
  drop the row if the longer completion does not fit with one prompt token before it.
- drop: drop the row.
- right: keep the prompt, cut the completions at max_length (their end-of-turn token goes).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from unitune.data.files import DataError, Row
from unitune.data.formats import DEFAULT_ROLES, NothingToLearn, _content, _role, _str, _with_system
from unitune.data.templates import assistant_spans, render
from unitune.data.tokenize import IGNORE, _fit

Text = list[dict] | str  # a conversation, or plain text


@dataclass
class PairSample:
    prompt: Text  # plain text only for the plain-text layout; completions then are plain text too
    chosen: Text  # one assistant message, or plain text
    rejected: Text
    where: str
    margin: float | None = None


@dataclass
class UnpairedSample:
    prompt: Text
    completion: Text  # one assistant message, or plain text after a plain-text prompt
    label: bool  # True: a desirable completion
    where: str


@dataclass
class PairExample:
    prompt_ids: list[int]  # shared by both sides
    chosen_ids: list[int]  # completion tokens only
    rejected_ids: list[int]
    where: str
    truncated: bool = False
    margin: float | None = None
    ref_logps: tuple[float, float] | None = None  # the reference's (chosen, rejected), when precomputed

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def n_loss(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    where: str
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def n_loss(self) -> int:
        return len(self.completion_ids)


def detect(row: Row) -> str | None:
    """'pairs', 'unpaired' or None. A row with only one of `chosen`/`rejected` counts as a pair, so that
    `to_pair` names the missing side instead of the row going unrecognised."""
    keys = row.data.keys()
    if "chosen" in keys or "rejected" in keys:
        return "pairs"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    return None


def _need(row: Row, keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if key not in row.data:
            need = f"{what} needs " + ", ".join(f"'{k}'" for k in keys)
            raise DataError(f"{row.columns}; {need}" if row.columns else f"{row.where}: missing '{key}'; {need}")


def _kind(row: Row, key: str) -> type | None:
    """list (messages), str (text) or None (absent or null); anything else is refused."""
    value = row.data.get(key)
    if value is None or (isinstance(value, float) and value != value):  # absent, null, or an empty Parquet cell (NaN)
        return None
    if isinstance(value, (list, str)):
        return type(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str  # an answer `42` stored as a number reads as its text, as in the SFT formats
    raise DataError(f"{row.where}: '{key}' is a {type(value).__name__}; write a string or a list of "
                    "{\"role\": ..., \"content\": ...} messages")


def _text(row: Row, key: str) -> str:
    text = _str(row, key)
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = json.loads(stripped)
        except ValueError:
            return text
        if isinstance(value, list) and value and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value):
            raise DataError(f"{row.where}: '{key}' is a string holding a JSON list of messages (a CSV cell, or JSON "
                            "encoded twice?); store the messages as a list, in a JSONL or Parquet file")
    return text


def _messages(row: Row, key: str, roles: frozenset[str]) -> list[dict]:
    turns = row.data[key]
    if not turns:
        raise DataError(f"{row.where}: '{key}' is an empty list; write its messages or drop the row")
    at = Row(row.data, f"{row.where}: '{key}'", row.columns)  # formats' errors then name the field too
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{at.where}: message {i} is a {type(turn).__name__}, not an object; write each turn as "
                            "{\"role\": ..., \"content\": ...}")
        messages.append({"role": _role(at, i, turn, roles), "content": _content(at, i, turn)})
    return messages


def _answer(row: Row, key: str, messages: list[dict], after: str) -> list[dict]:
    if not messages:
        raise NothingToLearn(f"{row.where}: '{key}' has no answer after {after}; write it or drop the row")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        got = [m["role"] for m in messages]
        raise DataError(f"{row.where}: '{key}' must be one assistant message after {after}, got roles {got}; "
                        "put the conversation before the answer in the prompt")
    if not messages[0]["content"].strip():
        raise NothingToLearn(f"{row.where}: '{key}' is an empty answer; write it or drop the row")
    return messages


def _prompt(row: Row, messages: list[dict], system: str | None, roles: frozenset[str]) -> list[dict]:
    if messages[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{row.where}: the prompt's last turn is '{messages[-1]['role']}'; the answers must follow a "
                        "user (or tool) turn: move that turn into 'chosen' and 'rejected' or drop it")
    return _with_system(row, messages, _str(row, "system", required=False) or system, roles)


def _shared_prefix(row: Row, chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    if chosen == rejected:
        raise DataError(f"{row.where}: 'chosen' and 'rejected' are the same conversation; write two different "
                        "answers or drop the row")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{row.where}: 'chosen' and 'rejected' differ from their first message, so they share no "
                        "prompt; give both the same conversation up to the answers, or add a 'prompt'")
    return chosen[:n], chosen[n:], rejected[n:]


def _split_text(row: Row, chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's `extract_prompt` on strings: the common prefix, a space before the split going to the completions."""
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
    if n is None:
        what = "the same text" if chosen == rejected else "one text followed by more, so one answer is empty"
        raise DataError(f"{row.where}: 'chosen' and 'rejected' are {what}; write two different answers or drop the row")
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    if not chosen[:n].strip():
        raise DataError(f"{row.where}: 'chosen' and 'rejected' share no prompt text (they differ from the start); "
                        "add a 'prompt' column, or write both as the prompt followed by the answer")
    if not chosen[n:].strip() or not rejected[n:].strip():
        raise NothingToLearn(f"{row.where}: after the prompt they share, an answer is only whitespace; write it or drop the row")
    return chosen[:n], chosen[n:], rejected[n:]


def _margin(row: Row) -> float | None:
    value = row.data.get("margin")
    if value is None or value == "":  # absent, or a CSV cell left empty
        return None
    try:
        margin = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        margin = math.nan
    if not math.isfinite(margin):
        raise DataError(f"{row.where}: 'margin' is {value!r}; write a finite number (how much better 'chosen' is) "
                        "or leave it empty")
    return margin


def _turn(row: Row, key: str) -> list[dict]:
    """A string `prompt` as one user turn, a string answer as one assistant turn."""
    text = _text(row, key)
    if key == "prompt":
        if not text.strip():
            raise DataError(f"{row.where}: 'prompt' is empty; write the question or drop the row")
        return [{"role": "user", "content": text}]
    return [{"role": "assistant", "content": text}]


def _alike(row: Row, a: str, b: str) -> type:
    """The kind (str or list of messages) of two fields that must both be filled in, and alike."""
    kinds = {key: _kind(row, key) for key in (a, b)}
    for key, kind in kinds.items():
        if kind is None:
            raise DataError(f"{row.where}: '{key}' is empty (null); fill it in or drop the row")
    if kinds[a] is not kinds[b]:
        raise DataError(f"{row.where}: '{a}' is a {kinds[a].__name__} but '{b}' a {kinds[b].__name__}; write both "
                        "as strings or both as lists of messages")
    return kinds[a]


def to_pair(row: Row, system: str | None = None, roles: frozenset[str] = DEFAULT_ROLES) -> PairSample:
    """The row's pair in any layout of the module docstring; `roles`: those the model's chat template renders."""
    _need(row, ("chosen", "rejected"), "a preference pair")
    kind, prompt = _alike(row, "chosen", "rejected"), _kind(row, "prompt")
    after = "the prompt"
    if kind is list:
        c, r = _messages(row, "chosen", roles), _messages(row, "rejected", roles)
        if prompt is list:
            p = _messages(row, "prompt", roles)
        else:
            (p, c, r), after = _shared_prefix(row, c, r), "the messages 'chosen' and 'rejected' share"
    elif prompt is list:
        raise DataError(f"{row.where}: 'prompt' is a list of messages but the answers are strings; write 'chosen' and "
                        "'rejected' as lists of one assistant message")
    elif prompt is None:
        if system or row.data.get("system"):
            raise DataError(f"{row.where}: a system prompt, but this pair is plain text (no 'prompt'), which no chat "
                            "template renders; remove the system prompt or write the rows as conversations")
        return PairSample(*_split_text(row, _text(row, "chosen"), _text(row, "rejected")), row.where, _margin(row))
    else:
        p, c, r = _turn(row, "prompt"), _turn(row, "chosen"), _turn(row, "rejected")
    c, r = _answer(row, "chosen", c, after), _answer(row, "rejected", r, after)
    if c == r:
        raise DataError(f"{row.where}: 'chosen' and 'rejected' are the same answer; write two different answers or "
                        "drop the row")
    return PairSample(_prompt(row, p, system, roles), c, r, row.where, _margin(row))


_LABELS = {"true": True, "1": True, "false": False, "0": False}


def _label(row: Row) -> bool:
    value = row.data.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):  # Parquet and pandas store 0/1 as numbers
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:  # CSV cells are text
        return _LABELS[value.strip().lower()]
    raise DataError(f"{row.where}: 'label' is {value!r}; write true (a desirable completion) or false (an "
                    "undesirable one)")


def to_unpaired(row: Row, system: str | None = None, roles: frozenset[str] = DEFAULT_ROLES) -> UnpairedSample:
    """`prompt`, `completion` and `label`: strings (one user turn, one assistant turn) or message lists."""
    _need(row, ("prompt", "completion", "label"), "unpaired feedback")
    label = _label(row)
    if _alike(row, "prompt", "completion") is list:
        p, c = _messages(row, "prompt", roles), _messages(row, "completion", roles)
    else:
        p, c = _turn(row, "prompt"), _turn(row, "completion")
    return UnpairedSample(_prompt(row, p, system, roles), _answer(row, "completion", c, "the prompt"), label, row.where)


def to_prompt(row: Row, system: str | None = None, roles: frozenset[str] = DEFAULT_ROLES) -> list[dict]:
    """A prompt for online RL: `prompt` as a string (one user turn) or a list of messages ending with a user
    turn. The row's other columns stay on the row, for the reward functions."""
    _need(row, ("prompt",), "a prompt row")
    kind = _kind(row, "prompt")
    if kind is None:
        raise DataError(f"{row.where}: 'prompt' is empty (null); fill it in or drop the row")
    return _prompt(row, _messages(row, "prompt", roles) if kind is list else _turn(row, "prompt"), system, roles)


def unpair(pair: PairSample) -> tuple[UnpairedSample, UnpairedSample]:
    """A pair as two unpaired rows, chosen desirable and rejected not: how TRL's KTOTrainer reads a pair file
    (`unpair_preference_dataset`)."""
    return (UnpairedSample(pair.prompt, pair.chosen, True, pair.where),
            UnpairedSample(pair.prompt, pair.rejected, False, pair.where))


def _completion_texts(tok: PreTrainedTokenizerBase, prompt: list[dict], completions: list[list[dict]],
                      where: str) -> tuple[str, list[str]]:
    """The prompt as rendered for generation, and each completion as the template writes it, through its end-of-turn token."""
    try:
        texts = []
        for completion in completions:
            full, spans = assistant_spans(tok, prompt + completion)
            texts.append(full[slice(*spans[-1])])
        return render(tok, prompt, add_generation_prompt=True), texts
    except DataError as err:  # a turn that cannot be located exactly
        raise DataError(f"{where}: {err}") from None
    except Exception as err:  # a Jinja error in the template, e.g. an unexpected role or order
        raise DataError(f"{where}: the chat template cannot render this conversation: {err}") from None


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _tokenize(tok: PreTrainedTokenizerBase, prompt: Text, completions: list[Text], where: str) -> tuple[list[int], list[list[int]]]:
    plain = isinstance(prompt, str)
    if plain:
        prompt_text, texts = prompt, completions
    else:
        prompt_text, texts = _completion_texts(tok, prompt, completions, where)
    # A chat template writes BOS itself; plain text gets what the tokenizer adds, as in TRL.
    prompt_ids = tok(prompt_text, add_special_tokens=plain)["input_ids"]
    fulls = []
    for text in texts:
        ids = tok(prompt_text + text, add_special_tokens=plain)["input_ids"]
        if plain and tok.eos_token_id is not None and ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)  # so the model learns where an answer ends
        fulls.append(ids)
    n = min(_common(prompt_ids, ids) for ids in fulls)
    if n == 0 or not all(len(ids) > n for ids in fulls):
        raise DataError(f"{where}: the prompt and its answers share no first token, or an answer adds none; check "
                        "that the prompt is not empty and each answer has text")
    return prompt_ids[:n], [ids[n:] for ids in fulls]


def _truncate(prompt: list[int], completions: list[list[int]], max_length: int, truncation: str,
              bos: int | None) -> tuple[list[int], list[list[int]]] | None:
    """Fit prompt + the longest completion into max_length as `truncation` says (module docstring); None drops."""
    longest = max(completions, key=len)
    if len(prompt) + len(longest) <= max_length:
        return prompt, completions
    if truncation == "drop":
        return None
    if truncation == "right":
        room = max_length - len(prompt)
        return (prompt, [c[:room] for c in completions]) if room > 0 else None
    # SFT's cut with the longest completion as the answer: the same rule for a BOS that opens the text.
    ids = prompt + longest
    fitted = _fit(ids, [True] * len(ids), (len(prompt), len(ids)), max_length, "prompt", bos)
    return None if fitted is None else (fitted[0][: len(fitted[0]) - len(longest)], completions)


def tokenize_pair(tok: PreTrainedTokenizerBase, pair: PairSample, max_length: int,
                  truncation: str = "prompt") -> PairExample | None:
    """The pair as token ids, or None when `truncation` drops it for being longer than max_length."""
    prompt, (chosen, rejected) = _tokenize(tok, pair.prompt, [pair.chosen, pair.rejected], pair.where)
    if chosen == rejected:
        raise DataError(f"{pair.where}: 'chosen' and 'rejected' give the same tokens once rendered (they differ only in "
                        "whitespace the template strips?); write two different answers or drop the row")
    fitted = _truncate(prompt, [chosen, rejected], max_length, truncation, tok.bos_token_id)
    if fitted is None:
        return None
    kept, (c, r) = fitted
    return PairExample(kept, c, r, pair.where, (len(kept), len(c), len(r)) != (len(prompt), len(chosen), len(rejected)),
                       pair.margin)


def tokenize_unpaired(tok: PreTrainedTokenizerBase, sample: UnpairedSample, max_length: int,
                      truncation: str = "prompt") -> UnpairedExample | None:
    prompt, (completion,) = _tokenize(tok, sample.prompt, [sample.completion], sample.where)
    fitted = _truncate(prompt, [completion], max_length, truncation, tok.bos_token_id)
    if fitted is None:
        return None
    kept, (c,) = fitted
    return UnpairedExample(kept, c, sample.label, sample.where, (len(kept), len(c)) != (len(prompt), len(completion)))


def _rows(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """(prompt, completion) rows, right-padded; targets on completion tokens only, shifted as SFT's Example.targets."""
    width = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, (p, c) in enumerate(sequences):
        n = len(p) + len(c)
        ids[r, :n] = torch.tensor(p + c)
        attn[r, :n] = 1
        targets[r, len(p) - 1 : n - 1] = torch.tensor(c)  # position t predicts token t+1
    return {"input_ids": ids, "attention_mask": attn, "targets": targets}


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict:
    """Rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected (TRL's DataCollatorForPreference layout): one forward
    pass for both sides. `margin` [B] when every pair has one; `ref_logps` [B, 2] when every pair has its
    reference log-probabilities precomputed (engine/precompute.py)."""
    batch = _rows([(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples],
                  pad_id)
    batch.update(real_tokens=int(batch["attention_mask"].sum()), pairs=len(examples))
    if all(e.margin is not None for e in examples):
        batch["margin"] = torch.tensor([e.margin for e in examples], dtype=torch.float)
    if all(e.ref_logps is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.ref_logps for e in examples], dtype=torch.float)
    return batch


def collate_unpaired(examples: list[UnpairedExample], pad_id: int, max_length: int | None = None) -> dict:
    """The rows, and KTO's mismatched rows for its KL estimate, built as TRL's KTOTrainer does: row i's prompt
    with row i-1's completion (row 0 with the last), completions rotated by one within the batch, and each KL
    row cut to max_length keeping its start (DataCollatorForUnpairedPreference). With one row per batch the
    KL row is the row itself: the objective must ask for batches of two or more. `real_tokens` counts the
    matched rows only."""
    batch = _rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    kl = _rows([(e.prompt_ids, examples[i - 1].completion_ids[: max_length - len(e.prompt_ids) if max_length else None])
                for i, e in enumerate(examples)], pad_id)
    batch.update(real_tokens=int(batch["attention_mask"].sum()),
                 label=torch.tensor([e.label for e in examples], dtype=torch.bool),
                 kl_input_ids=kl["input_ids"], kl_attention_mask=kl["attention_mask"], kl_targets=kl["targets"])
    return batch
