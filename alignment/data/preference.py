"""Preference pairs: reading every common shape, checking, and tokenizing (shared by RM and DPO).

Shapes (detected, or named with `data.format`):
- ``explicit``: ``prompt`` / ``chosen`` / ``rejected`` as strings or message lists; optional
  ``chosen_truncated`` / ``rejected_truncated`` (true: a sample cut by a token limit, as `align pairs`
  writes them) train that response as sampled, without the end-of-turn token it never produced.
- ``implicit``: ``chosen`` and ``rejected`` as full message lists (the shared prefix up to the final assistant
  turn is the prompt), or as strings that share their beginning (that beginning is the prompt, as TRL's
  ``extract_prompt`` finds it).
- ``hh``: raw Anthropic hh-rlhf transcripts (``\\n\\nHuman: ...\\n\\nAssistant: ...``)
  split into turns; the prompt is everything before the final assistant turn.
- ``ab``: ``response_a`` / ``response_b`` with ``label`` (0/1, "a"/"b") or per-response
  scores ``score_a`` / ``score_b`` (the score gap becomes the pair's margin).

Checks per pair (each failure is counted in the data report, never silently trained
on): both responses non-empty (also after truncation), chosen and rejected share the
prompt, the two responses differ. Tokenization gives chosen and rejected the very same
prompt token ids, so the prompt/response boundary is identical on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignment.data import text
from alignment.data.report import DataReport
from alignment.data.shapes import check_messages, check_string, detect_shape, parse_hh_transcript
from alignment.data.sources import DataError, Row
from alignment.data.text import Prompt


@dataclass
class PreferencePair:
    prompt: Prompt            # chat messages, or raw text (no chat template) when the row is plain text
    chosen: Any               # list of messages (usually one assistant turn) or raw text
    rejected: Any
    origin: str
    margin: float | None = None
    chosen_truncated: bool = False
    """A sampled response that max_new_tokens cut: trained as sampled, without an end of turn."""
    rejected_truncated: bool = False


class PairRejected(Exception):
    """A row that is well-formed but unusable as a pair; carries the report reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _split_final_assistant(messages: list[dict], origin: str, field: str) -> tuple[list[dict], list[dict]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{origin}: field '{field}' has no assistant turn")
    if last == 0:
        raise PairRejected("no prompt before the final assistant turn")
    return messages[:last], messages[last:]


def implicit_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a standard implicit-prompt pair: the prompt is the text both start with, as
    TRL's `extract_prompt` finds it (a space before the point where they part stays with the responses)."""
    from trl.data_utils import extract_prompt  # TRL's own reading of this shape; trl is heavy to import

    parts = extract_prompt({"chosen": chosen, "rejected": rejected})
    return parts["prompt"], parts["chosen"], parts["rejected"]


def _as_response(value: Any, origin: str, field: str) -> Any:
    if isinstance(value, list):
        return check_messages(value, origin, field)
    return check_string(value, origin, field)


def to_pair(row: Row, shape: str = "auto") -> PreferencePair:
    """Normalise one row; raises DataError (malformed) or PairRejected (unusable)."""
    row.check()
    data, origin = row.data, row.origin
    shape = detect_shape(data, origin) if shape == "auto" else shape
    margin = None
    if shape == "explicit":
        prompt = data.get("prompt")
        prompt = check_messages(prompt, origin, "prompt") if isinstance(prompt, list) else check_string(prompt, origin, "prompt")
        chosen = _as_response(data.get("chosen"), origin, "chosen")
        rejected = _as_response(data.get("rejected"), origin, "rejected")
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise DataError(f"{origin}: fields 'chosen' and 'rejected' must both be strings or both message lists")
        if isinstance(prompt, str) and isinstance(chosen, list):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and isinstance(chosen, str):
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    elif shape == "implicit" and isinstance(data.get("chosen"), str) and isinstance(data.get("rejected"), str):
        prompt, chosen, rejected = implicit_text_prompt(data["chosen"], data["rejected"])
        if not prompt.strip():
            raise PairRejected("chosen and rejected share no beginning (no implicit prompt)")
    elif shape in ("implicit", "hh"):
        if shape == "hh":
            full_c = parse_hh_transcript(data.get("chosen"), origin, "chosen")
            full_r = parse_hh_transcript(data.get("rejected"), origin, "rejected")
        else:
            full_c = check_messages(data.get("chosen"), origin, "chosen")
            full_r = check_messages(data.get("rejected"), origin, "rejected")
        prompt, chosen = _split_final_assistant(full_c, origin, "chosen")
        prompt_r, rejected = _split_final_assistant(full_r, origin, "rejected")
        if prompt != prompt_r:
            raise PairRejected("chosen and rejected have different prompts")
    elif shape == "ab":
        prompt = data.get("prompt")
        prompt = check_messages(prompt, origin, "prompt") if isinstance(prompt, list) else check_string(prompt, origin, "prompt")
        a = _as_response(data.get("response_a"), origin, "response_a")
        b = _as_response(data.get("response_b"), origin, "response_b")
        if "label" in data:
            label = str(data["label"]).strip().lower()
            if label not in ("0", "1", "a", "b"):
                raise DataError(f"{origin}: field 'label' must be 0/1 or a/b, got {data['label']!r}")
            a_wins = label in ("0", "a")
        elif "score_a" in data and "score_b" in data:
            try:
                score_a, score_b = float(data["score_a"]), float(data["score_b"])
            except (TypeError, ValueError):
                raise DataError(f"{origin}: fields 'score_a'/'score_b' must be numbers") from None
            if score_a == score_b:
                raise PairRejected("tied scores")
            a_wins, margin = score_a > score_b, abs(score_a - score_b)
        else:
            raise DataError(f"{origin}: an A/B row needs field 'label' or fields 'score_a' and 'score_b'")
        chosen, rejected = (a, b) if a_wins else (b, a)
        if isinstance(prompt, str) and isinstance(chosen, list):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and isinstance(chosen, str):
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    else:
        raise DataError(f"{origin}: unknown preference format {shape!r}")
    if "margin" in data and margin is None and data["margin"] is not None:
        try:
            margin = float(data["margin"])
        except (TypeError, ValueError):
            raise DataError(f"{origin}: field 'margin' must be a number") from None
    if _text(chosen).strip() == "" or _text(rejected).strip() == "":
        raise PairRejected("empty response")
    if chosen == rejected:
        raise PairRejected("chosen identical to rejected")
    flags = {}
    for name in ("chosen_truncated", "rejected_truncated"):
        value = data.get(name, False)
        if not isinstance(value, bool):
            raise DataError(f"{origin}: field {name!r} must be true or false, got {value!r}")
        flags[name] = value
    return PreferencePair(prompt, chosen, rejected, origin, margin, **flags)


def _text(response: Any) -> str:
    return response if isinstance(response, str) else "".join(m["content"] for m in response)


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]     # response tokens only
    rejected_ids: list[int]
    origin: str
    margin: float | None = None

    def sequence(self, which: str) -> list[int]:
        return self.prompt_ids + (self.chosen_ids if which == "chosen" else self.rejected_ids)


def tokenize_pair(pair: PreferencePair, tokenizer, max_length: int, max_prompt_length: int | None,
                  report: DataReport, reward_model: bool = False) -> TokenizedPair:
    """Shared prompt ids + each response's ids (alignment.data.text), fitted to max_length.

    A policy (DPO) reads a response up to its end-of-turn token; a reward model reads the
    standard rendering, so its responses carry the template's suffix too; a response marked truncated
    (a sample cut by its token limit) ends where the sample ended, for both. Truncation
    (text.fit): the prompt keeps its last `max_prompt_length` tokens (default half of
    max_length) only when prompt + longer response would not fit; each response is then cut
    to the room left. A response cut to nothing rejects the pair (FAILURES rows 13, 14).
    """
    try:
        chosen = text.encode(tokenizer, pair.prompt, pair.chosen)
        rejected = text.encode(tokenizer, pair.prompt, pair.rejected)
    except text.TemplateError as exc:
        raise DataError(f"{pair.origin}: {exc}") from None
    assert chosen.prompt_ids == rejected.prompt_ids  # the same prompt text, tokenized alone
    if chosen.resplit or rejected.resplit:
        report.notes["response re-tokenized at the prompt boundary"] += 1
    try:  # a truncated sample as it was sampled, for a policy and a reward model alike
        responses = [text.unfinished_response_ids(tokenizer, e) if cut
                     else e.response_ids + (e.suffix_ids if reward_model else [])
                     for e, cut in ((chosen, pair.chosen_truncated), (rejected, pair.rejected_truncated))]
    except text.TemplateError as exc:
        raise DataError(f"{pair.origin}: {exc}") from None
    prompt_ids, (chosen_ids, rejected_ids), cut = text.fit(chosen.prompt_ids, responses, max_length,
                                                           max_prompt_length, tokenizer.bos_token_id)
    report.truncated += cut
    if not chosen_ids or not rejected_ids:
        raise PairRejected("a response is empty after truncation")
    if chosen_ids == rejected_ids:
        raise PairRejected("chosen identical to rejected after truncation")
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair.origin, pair.margin)


def load_pairs(rows: list[Row], tokenizer, data_cfg, max_prompt_length: int | None, report: DataReport,
               reward_model: bool = False) -> list[TokenizedPair]:
    """Rows -> tokenized pairs (for a reward model when `reward_model`, else for a policy); malformed rows
    raise (or are skipped and counted), unusable ones are counted."""
    pairs = []
    report.rows_read += len(rows)
    for row in rows:
        try:
            pair = to_pair(row, data_cfg.format)
            tokenized = tokenize_pair(pair, tokenizer, data_cfg.max_length, max_prompt_length, report, reward_model)
        except PairRejected as exc:
            report.drop(exc.reason, row.origin)
            continue
        except DataError as exc:
            if data_cfg.on_bad_row == "error":
                raise
            report.skip(str(exc).split(": ", 1)[-1][:60], str(exc), row.origin)
            continue
        pairs.append(tokenized)
        report.tokens += len(tokenized.prompt_ids) * 2 + len(tokenized.chosen_ids) + len(tokenized.rejected_ids)
    report.examples = len(pairs)
    return pairs


