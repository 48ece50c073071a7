"""Row shapes: checking the fields of a row and telling which shape it has (docs/data-formats.md).

The shapes are TRL's dataset types, each in its standard form (strings) and its conversational form (lists of
{"role", "content"} messages), plus hh-rlhf transcripts and A/B rows:
- language modeling: ``text``, or ``messages`` (SFT);
- prompt-completion: ``prompt`` + ``completion`` (SFT; its prompt alone serves online RL);
- prompt-only: ``prompt`` (online RL);
- preference, explicit prompt: ``prompt`` + ``chosen`` + ``rejected``; implicit prompt: ``chosen`` + ``rejected``
  that share their beginning (reward models, DPO; the prompt alone serves online RL);
- unpaired preference: ``prompt`` + ``completion`` + ``label`` (true: a good answer; KTO).
A row whose shape cannot be told is refused with its fields named and one example of each shape the stage
takes; a row with one field of a pair missing is refused naming that field.
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


EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}',
    "prompt_completion": '{"prompt": "What is 2+2?", "completion": "4"}  (or message lists)',
    "text": '{"text": "The quick brown fox jumps over the lazy dog."}',
    "prompt": '{"prompt": "What is 2+2?"}  (or a message list; extra fields reach reward functions)',
    "explicit": '{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}  (or message lists)',
    "implicit": '{"chosen": [user turn, assistant turn], "rejected": [the same user turn, another answer]}  (or '
                'strings sharing their beginning: {"chosen": "2+2 is 4", "rejected": "2+2 is 5"})',
    "hh": '{"chosen": "\\n\\nHuman: What is 2+2?\\n\\nAssistant: 4", "rejected": "...Assistant: 5"}  (hh-rlhf)',
    "ab": '{"prompt": "What is 2+2?", "response_a": "4", "response_b": "5", "label": "a"}  (or score_a/score_b)',
    "unpaired": '{"prompt": "What is 2+2?", "completion": "4", "label": true}  (or message lists; KTO)',
}
ACCEPTED = {
    "sft": ("messages", "prompt_completion", "text"),
    "preference": ("explicit", "implicit", "hh", "ab"),
    "prompt": ("prompt", "messages"),
    "unpaired": ("unpaired",),
}
STAGE_OF = {"sft": "align sft", "preference": "align rm / align dpo", "prompt": "align ppo", "unpaired": "align kto"}
KEYS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",),
        "prompt": ("prompt",), "explicit": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected"),
        "hh": ("chosen", "rejected"), "ab": ("response_a", "response_b"), "unpaired": ("prompt", "completion", "label")}
KIND = {"sft": "an SFT", "preference": "a preference", "prompt": "a prompt-only", "unpaired": "an unpaired preference"}
PAIRS = (("chosen", "rejected"), ("response_a", "response_b"), ("prompt", "completion"))


def unknown_shape(row: dict, origin: str, purpose: str) -> DataError:
    """The error for a row of no shape `purpose` takes: a missing half of a pair of fields named, else every
    accepted shape shown by example."""
    for first, second in PAIRS:
        if (first in row) != (second in row) and not (purpose == "prompt" and first == "prompt"):
            missing, present = (second, first) if first in row else (first, second)
            return DataError(f"{origin}: field '{missing}' is missing (the row has '{present}'; fields: "
                             f"{sorted(row)})")
    expected = ", ".join(dict.fromkeys(" + ".join(f"'{k}'" for k in KEYS[shape]) for shape in ACCEPTED[purpose]))
    lines = [f"{origin}: cannot tell the row's shape from its fields {sorted(row)}; expected {expected}: "
             f"{STAGE_OF[purpose]} takes rows like"]
    lines += [f"    {EXAMPLES[shape]}" for shape in ACCEPTED[purpose]]
    for other in ("unpaired", "preference", "sft", "prompt"):  # the most telling shape first
        if other != purpose and shape_of(row, other) is not None:
            lines.append(f"  (this is {KIND[other]} row: {STAGE_OF[other]} trains on it)")
            break
    return DataError("\n".join(lines))


def shape_of(row: dict, purpose: str) -> str | None:
    """The shape of `row` among those `purpose` takes ("sft", "preference", "prompt", "unpaired"), or None."""
    if purpose == "sft":
        if "messages" in row or "conversations" in row:
            return "messages"
        if "prompt" in row and "completion" in row and "label" not in row:
            return "prompt_completion"
        return "text" if "text" in row else None
    if purpose == "preference":
        if "response_a" in row and "response_b" in row:
            return "ab"
        if "chosen" in row and "rejected" in row:
            if "prompt" in row:
                return "explicit"
            if isinstance(row["chosen"], str) and "\n\nAssistant:" in row["chosen"]:
                return "hh"
            return "implicit"
        return None
    if purpose == "prompt":
        if "prompt" in row:
            return "prompt"
        return "messages" if "messages" in row else None
    return "unpaired" if {"prompt", "completion", "label"} <= set(row) else None


def detect_sft_format(row: dict, origin: str) -> str:
    shape = shape_of(row, "sft")
    if shape is None:
        raise unknown_shape(row, origin, "sft")
    return shape


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
    """A preference row's shape: explicit, implicit, hh or ab."""
    shape = shape_of(row, "preference")
    if shape is None:
        raise unknown_shape(row, origin, "preference")
    return shape


def prompt_of(row: dict, origin: str):
    """The prompt of an online-RL row: its `prompt` (a string or messages; a prompt-completion or preference row's
    prompt too), or a conversation's turns before its last assistant turn (all of them when it ends with the
    user)."""
    shape = shape_of(row, "prompt")
    if shape is None:
        raise unknown_shape(row, origin, "prompt")
    if shape == "prompt":
        prompt = row["prompt"]
        if isinstance(prompt, list):
            return check_messages(prompt, origin, "prompt")
        if not isinstance(prompt, str):
            raise DataError(f"{origin}: field 'prompt' must be a string or a list of messages, got "
                            f"{type(prompt).__name__}")
        return prompt
    messages = check_messages(row["messages"], origin, "messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    if last == 0:
        raise DataError(f"{origin}: field 'messages' starts with an assistant turn: no prompt before it")
    return messages[:last]
