"""Where a chat template puts each assistant turn, for any template and without `{% generation %}` tags.

The conversation is rendered once, whole, and each assistant turn i is located in that text:
- it starts where its prompt ends: `messages[:i]` rendered with the generation prompt is a prefix of
  the whole text for most templates. Where it is not (Mistral moves the system prompt into whichever
  user turn it renders last), the tail of that prompt render, from the previous message's text through
  the generation prompt, is found in the whole text instead;
- it ends with the first end-of-turn token after its start (`end_of_turn_ids`: what generation stops
  at), so the model learns to write the turn and to stop, and nothing of the next header.
Diffing prefix renders (`messages[:i+1]` against the whole) fails on templates that render the last
assistant turn unlike earlier ones (FIELD-NOTES trap 13): Qwen3 writes `<think>` reasoning only for
turns after the last user message, so a render that ends at turn i shows reasoning the whole text lacks.

Each turn is checked before it is used: the text between its start and its end-of-turn marker must end
with what the assistant said (reasoning in `<think>...</think>` aside, which templates may rewrite or
drop). A turn that fails is refused with a DataError, never masked on a guess.

What is learned follows the real template, i.e. what the model reads and writes at inference. With
Qwen3, earlier turns teach their answers only (the template drops their reasoning from the history),
the final turn its reasoning and answer. TRL instead swaps in a patched template that keeps every
turn's reasoning (trl/chat_templates/qwen3_training.jinja), training on histories the model never sees
at inference. To teach the reasoning of every turn here, give one row per turn.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from unitune.data.files import DataError
from unitune.models.loader import end_of_turn_ids


def render(tok: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _said(content: str) -> str:
    """The answer an assistant message gives, without the reasoning block templates may rewrite or drop."""
    return content.split("</think>")[-1].strip()


def _turn_start(tok: PreTrainedTokenizerBase, messages: list[dict], i: int, full: str, cursor: int) -> int:
    prompt = render(tok, messages[:i], add_generation_prompt=True)
    if full.startswith(prompt):
        return len(prompt)
    before = messages[i - 1]["content"].strip()
    cut = prompt.rfind(before) if before else -1
    at = full.find(prompt[cut:], cursor) if cut >= 0 else -1
    if at < 0:
        raise DataError(
            f"message {i} (assistant): the chat template renders the conversation before this turn differently "
            "on its own than inside the whole conversation, so where the turn starts is unknown; give this turn "
            "its own row (the conversation up to it) or set model.chat_template to a template that renders "
            "earlier turns the same way whatever follows"
        )
    return at + len(prompt) - cut


def _turn_end(full: str, start: int, markers: list[str], said: str, i: int) -> int:
    hits = [(at, m) for m in markers if (at := full.find(m, start)) >= 0]
    if not hits:
        raise DataError(
            f"message {i} (assistant): no end-of-turn token ({', '.join(markers)}) follows this turn in the "
            "rendered conversation, so the model could not learn to stop; set model.chat_template to a template "
            "that closes assistant turns with one"
        )
    at, marker = min(hits)
    if not full[start:at].rstrip().endswith(said):
        raise DataError(
            f"message {i} (assistant): the rendered turn does not end with the message's text before "
            f"'{marker}': the text contains the end-of-turn marker, or the chat template rewrites it; remove "
            "the marker from the text or use a template that writes assistant messages as given"
        )
    return at + len(marker)


def assistant_spans(tok: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn marker included).

    An assistant message that opens the conversation has no prompt to answer: it is context, not a turn.
    """
    full = render(tok, messages)
    markers = [tok.decode([t]) for t in end_of_turn_ids(tok)]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        start = _turn_start(tok, messages, i, full, cursor)
        cursor = _turn_end(full, start, markers, _said(m["content"]), i)
        spans.append((start, cursor))
    return full, spans
