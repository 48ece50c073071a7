"""Row shapes: checking the fields of a row and telling which shape it has.

SFT shapes: chat ``messages``; ``prompt``/``completion`` as strings or message lists; plain ``text``.
Preference shapes: see alignment.data.preference.
"""

from __future__ import annotations

import re
from typing import Any

from alignment.data.sources import DataError


def check_messages(value: Any, origin: str, field_name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{origin}: field '{field_name}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{origin}: field '{field_name}[{i}]' must be an object with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise DataError(f"{origin}: field '{field_name}[{i}].content' must be a string")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{origin}: field '{field_name}[{i}].role' has unknown role {message['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_string(value: Any, origin: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{origin}: field '{field_name}' must be a string, got {type(value).__name__}")
    return value


def detect_sft_format(row: dict, origin: str) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DataError(
        f"{origin}: cannot tell the row's shape from its fields {sorted(row)}; "
        "expected 'messages', 'prompt'+'completion' or 'text'"
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, origin: str, field: str) -> list[dict]:
    """`\\n\\nHuman: a\\n\\nAssistant: b ...` -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    if not isinstance(text, str):
        raise DataError(f"{origin}: field '{field}' must be a string transcript")
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise DataError(f"{origin}: field '{field}' has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def detect_shape(row: dict, origin: str) -> str:
    if "response_a" in row and "response_b" in row:
        return "ab"
    if "chosen" in row and "rejected" in row:
        if "prompt" in row:
            return "explicit"
        if isinstance(row["chosen"], str) and "\n\nAssistant:" in row["chosen"]:
            return "hh"
        return "implicit"
    raise DataError(
        f"{origin}: cannot tell the preference shape from fields {sorted(row)}; expected prompt/chosen/rejected, "
        "chosen/rejected conversations, hh-rlhf transcripts, or response_a/response_b with label or scores"
    )


