"""Row formats -> a conversation or plain text.

- instruction: {instruction, input?, output, system?} (Alpaca)
- chat: {messages: [{role, content}]}, content a string or OpenAI's list of typed parts;
  ShareGPT's {conversations: [{from, value}]} is accepted
- text: {text} for plain language modelling

A chat row must leave something to learn: an assistant turn with text in it. Its roles must be ones
the model's chat template renders (`template_roles`), or the template would fail, or silently drop them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unitune.data.files import DataError, Row


class NothingToLearn(DataError):
    """A row that would teach nothing (no or empty answer): an error, or skipped with data.nothing_to_learn=skip."""

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool"}  # LLaMA-Factory's name for a tool's answer
DEFAULT_ROLES = frozenset({"system", "user", "assistant", "tool"})
REQUIRED = {"instruction": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}


@dataclass
class Sample:
    messages: list[dict] | None  # a conversation, or None for plain text
    text: str | None
    where: str


def template_roles(tok: PreTrainedTokenizerBase) -> frozenset[str]:
    """The roles the tokenizer's chat template renders.

    A ChatML-style template writes whatever role it is given, so a typo would train as a role of its own:
    for those, the roles every such model knows. Otherwise the candidates are system/user/assistant and
    the names the template spells out as strings, each kept if a short conversation with it renders
    without raising and with its text in the output (a template may drop a role it does not know).
    """
    template = tok.chat_template
    if not template:
        return DEFAULT_ROLES
    if _renders(tok, "unitune_probe_role"):
        return DEFAULT_ROLES
    sources = template.values() if isinstance(template, dict) else [template]
    candidates = {"system", "user", "assistant"} | {m for s in sources for m in re.findall(r"['\"]([a-z_]+)['\"]", s)}
    return frozenset(r for r in candidates if _renders(tok, r))


def _renders(tok: PreTrainedTokenizerBase, role: str) -> bool:
    mark = f"unitune-probe-{role}"
    turn, user, answer = {"role": role, "content": mark}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
    for conversation in ([turn, user, answer], [user, answer, turn, answer], [user, turn]):
        try:
            if mark in tok.apply_chat_template(conversation, tokenize=False):
                return True
        except Exception:  # a Jinja raise_exception: this order or role is refused; try the next order
            continue
    return False


def detect(row: Row) -> str:
    keys = row.data.keys()
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys or "output" in keys:
        return "instruction"
    if "text" in keys:
        return "text"
    expected = "expected 'messages' or 'conversations' (chat), 'instruction' + 'output' (instruction) or 'text' (text)"
    if row.columns:
        raise DataError(f"{row.columns}; cannot tell the format from them: {expected}")
    raise DataError(f"{row.where}: cannot tell the format from the keys {sorted(keys)}; {expected}")


def _check_keys(row: Row, fmt: str) -> None:
    """A missing key; in a CSV or Parquet file that is the header's fault, whichever row meets it first."""
    have = set(row.data) | ({"messages"} if "conversations" in row.data else set())  # ShareGPT's name for it
    missing = [k for k in REQUIRED[fmt] if k not in have]
    if missing:
        need = f"the {fmt} format needs " + " and ".join(f"'{k}'" for k in REQUIRED[fmt])
        raise DataError(f"{row.columns}; {need}" if row.columns else f"{row.where}: missing '{missing[0]}'; {need}")


def _text(value: Any) -> str | None:
    """A string, or a number written as one (JSON and Parquet store an answer `42` as a number); else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _checked(row: Row, text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a JSON escape like "\ud83d" cut from its pair: no tokenizer can encode it
        raise DataError(f"{row.where}: {what} holds a lone surrogate {text[err.start]!r} (an emoji cut in half?); "
                        "remove it") from None
    return text


def _str(row: Row, key: str, required: bool = True) -> str:
    value = row.data.get(key)
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN from CSV/Parquet
        if required:
            raise DataError(f"{row.where}: '{key}' is empty (null); fill it in or drop the row")
        return ""
    text = _text(value)
    if text is None:
        name = f"column '{key}' must hold strings" if row.columns else f"'{key}' must be a string"
        raise DataError(f"{row.where}: {name}, got {type(value).__name__}; write it as text")
    return _checked(row, text, f"'{key}'")


def _instruction(row: Row, system: str | None, roles: frozenset[str]) -> Sample:
    prompt = _str(row, "instruction")
    extra = _str(row, "input", required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    output = _str(row, "output")
    if not output.strip():
        raise NothingToLearn(f"{row.where}: 'output' is empty, so there is nothing to learn; write the answer or drop the row")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Sample(_with_system(row, messages, _str(row, "system", required=False) or system, roles), None, row.where)


def _with_system(row: Row, messages: list[dict], system: str | None, roles: frozenset[str]) -> list[dict]:
    if not system or messages[0]["role"] == "system":
        return messages
    if "system" not in roles:
        raise DataError(f"{row.where}: a system prompt (data.system_prompt or the row's 'system'), but the model's chat "
                        f"template does not render a system turn here (it renders {', '.join(sorted(roles))}); remove the system prompt")
    return [{"role": "system", "content": system}, *messages]


def _content(row: Row, i: int, turn: dict) -> str:
    content = turn.get("content", turn.get("value"))
    text = _text(content)
    if text is not None:
        return _checked(row, text, f"message {i}")
    if content is None:
        why = "; tool calls are not supported yet" if turn.get("tool_calls") else "; write its text or drop the turn"
        raise DataError(f"{row.where}: message {i} has no content (null){why}")
    if not isinstance(content, list):
        raise DataError(f"{row.where}: message {i} content is a {type(content).__name__}; write a string or a list "
                        "of {\"type\": \"text\", \"text\": ...} parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            if kind is None:
                raise DataError(f"{row.where}: message {i} content part {j} has no 'type'; write text as "
                                "{\"type\": \"text\", \"text\": ...}")
            raise DataError(f"{row.where}: message {i} has a content part of type '{kind}'; multimodal models are not "
                            "supported yet: keep only the text parts")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{row.where}: message {i} content part {j} has no string 'text'; add it or drop the part")
        texts.append(part["text"])
    # Back to back, as the chat templates of multimodal models (Llama 4, Qwen2-VL, SmolVLM) render text parts.
    return _checked(row, "".join(texts), f"message {i}")


def _role(row: Row, i: int, turn: dict, roles: frozenset[str]) -> str:
    if "from" in turn and "role" not in turn:
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise DataError(f"{row.where}: message {i} has 'from': {turn['from']!r}, not a ShareGPT role "
                            f"({', '.join(SHAREGPT_ROLES)}); rename it")
    else:
        role = turn.get("role")
        if not isinstance(role, str):
            raise DataError(f"{row.where}: message {i} has no string 'role' (or ShareGPT's 'from'); add one")
    if role not in roles:
        raise DataError(f"{row.where}: message {i} has role '{role}', which the model's chat template does not "
                        f"render (it renders {', '.join(sorted(roles))}); map it to one of those")
    return role


def _chat(row: Row, system: str | None, roles: frozenset[str]) -> Sample:
    key = "messages" if "messages" in row.data else "conversations"
    turns = row.data[key]
    if isinstance(turns, str):
        raise DataError(f"{row.where}: '{key}' is a string; it must be a list of {{role, content}} objects "
                        "(was it JSON-encoded twice?)")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where}: '{key}' must be a non-empty list of {{role, content}} objects; add the turns "
                        "or drop the row")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{row.where}: message {i} is a {type(turn).__name__}, not an object; write each turn as "
                            "{\"role\": ..., \"content\": ...}")
        role, content = _role(row, i, turn, roles), _content(row, i, turn)
        if role == "assistant" and not content.strip():
            raise NothingToLearn(f"{row.where}: message {i} is an empty assistant turn, which would teach the model to "
                            "answer with nothing; write the answer or drop the turn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise NothingToLearn(f"{row.where}: the conversation has no assistant message to learn from; add the answer "
                        "or drop the row")
    return Sample(_with_system(row, messages, system, roles), None, row.where)


def _plain(row: Row, system: str | None, roles: frozenset[str]) -> Sample:
    text = _str(row, "text")
    if not text.strip():
        raise NothingToLearn(f"{row.where}: 'text' is empty; write the document or drop the row")
    return Sample(None, text, row.where)


FORMATS = {"instruction": _instruction, "chat": _chat, "text": _plain}


def to_sample(row: Row, fmt: str, system: str | None = None, roles: frozenset[str] = DEFAULT_ROLES) -> Sample:
    """`roles`: those the model's chat template renders (`template_roles`); without a model, the usual four."""
    fmt = detect(row) if fmt == "auto" else fmt
    _check_keys(row, fmt)
    return FORMATS[fmt](row, system, roles)
