"""Row formats -> a conversation or plain text.

- instruction: {instruction, input?, output, system?} (Alpaca)
- chat: {messages: [{role, content}]}; ShareGPT's {conversations: [{from, value}]} is accepted
- text: {text} for plain language modelling
"""
from __future__ import annotations

from dataclasses import dataclass

from unitune.data.files import DataError, Row

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "function": "tool"}


@dataclass
class Sample:
    messages: list[dict] | None  # a conversation, or None for plain text
    text: str | None
    where: str


def detect(row: Row) -> str:
    keys = row.data.keys()
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "instruction"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{row.where}: cannot tell the format from the keys {sorted(keys)}; expected 'messages' or "
        "'conversations' (chat), 'instruction' + 'output' (instruction) or 'text' (text)"
    )


def _str(row: Row, key: str, required: bool = True) -> str:
    value = row.data.get(key)
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN from CSV/Parquet
        if required:
            raise DataError(f"{row.where}: missing '{key}'")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric answer in JSON or Parquet: 42 -> "42"
    if not isinstance(value, str):
        raise DataError(f"{row.where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _instruction(row: Row, system: str | None) -> Sample:
    prompt = _str(row, "instruction")
    extra = _str(row, "input", required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    messages = []
    system = _str(row, "system", required=False) or system
    if system:
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _str(row, "output")}]
    return Sample(messages, None, row.where)


def _chat(row: Row, system: str | None) -> Sample:
    turns = row.data.get("messages", row.data.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{row.where}: message {i} is not an object")
        role, content = t.get("role", t.get("from")), t.get("content", t.get("value"))
        role = SHAREGPT_ROLES.get(role, role) if "from" in t else role
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"{row.where}: message {i} needs string 'role' and 'content' (or 'from' and 'value')")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.where}: the conversation has no assistant message to learn from")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return Sample(messages, None, row.where)


def _text(row: Row, system: str | None) -> Sample:
    return Sample(None, _str(row, "text"), row.where)


FORMATS = {"instruction": _instruction, "chat": _chat, "text": _text}


def to_sample(row: Row, fmt: str, system: str | None = None) -> Sample:
    return FORMATS[detect(row) if fmt == "auto" else fmt](row, system)
