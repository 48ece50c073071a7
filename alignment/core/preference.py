"""Preference pairs: reading every common shape, checking, and tokenizing (shared by RM and DPO).

Shapes (detected, or named with `data.format`):
- ``explicit``: ``prompt`` / ``chosen`` / ``rejected`` as strings or message lists; optional
  ``chosen_truncated`` / ``rejected_truncated`` (true: a sample cut by a token limit, as `align pairs`
  writes them) train that response as sampled, without the end-of-turn token it never produced.
- ``implicit``: ``chosen`` and ``rejected`` as full message lists; the shared prefix
  up to the final assistant turn is the prompt.
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

import re
from dataclasses import dataclass
from typing import Any, Union

from alignment.core import text
from alignment.core.data import DataError, DataReport, Row, block_mask, check_messages, check_string

Prompt = Union[str, list[dict]]


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


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------

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


def _split_final_assistant(messages: list[dict], origin: str, field: str) -> tuple[list[dict], list[dict]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{origin}: field '{field}' has no assistant turn")
    if last == 0:
        raise PairRejected("no prompt before the final assistant turn")
    return messages[:last], messages[last:]


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


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


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
    """Shared prompt ids + each response's ids (alignment.core.text), fitted to max_length.

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
            report.dropped[exc.reason] += 1
            continue
        except DataError as exc:
            if data_cfg.on_bad_row == "error":
                raise
            report.skip(str(exc).split(": ", 1)[-1][:60], str(exc))
            continue
        pairs.append(tokenized)
        report.tokens += len(tokenized.prompt_ids) * 2 + len(tokenized.chosen_ids) + len(tokenized.rejected_ids)
    report.examples = len(pairs)
    return pairs


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, pack_to: int | str | None = None,
                  share_prompt: bool = False):
    """Chosen sequences then rejected ones, as one batch for a single forward pass.

    pack_to="shared" (DPO's dpo.share_prefix): one row for the micro-batch, see _shared_pairs_row.

    Default: right-padded rows [2B, T]. With pack_to (padding-free): the 2B sequences
    are packed first-fit-decreasing into rows of at most pack_to tokens, with position
    ids restarting per sequence and a block-diagonal causal mask, so no compute is spent
    on padding; `sequence_index` [R, W] maps every token to its sequence (-1 = padding)
    and `last_position` [2B, 2] gives each sequence's last token (row, column).

    With pack_to and share_prompt (reward models only): each pair is one segment
    [prompt | chosen | rejected] and its prompt runs once. The mask lets a chosen token
    see the prompt and the chosen tokens before it, a rejected token the prompt and the
    rejected tokens before it, never the other response; both responses' positions
    continue from the prompt's end. Every token thus has the same context and position
    as in its own sequence, so the hidden states at the two last tokens, and the rewards
    read there, are those of the separate sequences. Rows hold up to max(pack_to, the
    longest segment) tokens. No labels: a rejected response's first token is not preceded
    by its prompt in the row, so next-token targets (DPO) need the separate layout.

    labels mark response tokens (IGNORE on prompt and padding) for DPO's log-probs;
    the reward model reads its score at each sequence's last real token.
    """
    import torch

    from alignment.core.data import IGNORE

    margins = torch.tensor([p.margin if p.margin is not None else 0.0 for p in pairs], dtype=torch.float32)
    extra = {"margin": margins, "has_margin": any(p.margin is not None for p in pairs),
             "num_sequences": 2 * len(pairs),
             # Tokens of the 2B sequences, the same in every layout (a shared prompt counts twice).
             "sequence_tokens": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)}
    if pack_to == "shared":
        return {**_shared_pairs_row(pairs, pad_id), **extra}
    if share_prompt:
        if pack_to is None:
            raise ValueError("share_prompt needs packed rows (pack_to)")
        return {**_pack_shared_prompt(pairs, pad_id, pack_to), **extra}
    sequences, labels = [], []
    for which in ("chosen", "rejected"):
        for p in pairs:
            response = p.chosen_ids if which == "chosen" else p.rejected_ids
            sequences.append(p.prompt_ids + response)
            labels.append([IGNORE] * len(p.prompt_ids) + response)
    if pack_to is None:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        lab = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (seq, lbl) in enumerate(zip(sequences, labels)):
            ids[i, : len(seq)] = torch.tensor(seq)
            lab[i, : len(seq)] = torch.tensor(lbl)
            mask[i, : len(seq)] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask, **extra}
    return {**_pack_sequences(sequences, labels, pad_id, pack_to), **extra}


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens, longest first (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def _pack_sequences(sequences: list[list[int]], labels: list[list[int]], pad_id: int, capacity: int) -> dict:
    import torch

    from alignment.core.data import IGNORE

    rows = _first_fit_decreasing([len(s) for s in sequences], capacity)
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    lab = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    last = torch.zeros((len(sequences), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(sequences[i])
            ids[r, start : start + n] = torch.tensor(sequences[i])
            # The first token of a segment is never a target: it would be predicted from the previous sequence.
            lab[r, start : start + n] = torch.tensor([IGNORE] + labels[i][1:])
            mask[r, start : start + n] = 1
            positions[r, start : start + n] = torch.arange(n)
            seq_index[r, start : start + n] = i
            last[i] = torch.tensor([r, start + n - 1])
            start += n
    return {"input_ids": ids, "labels": lab, "attention_mask": mask, "position_ids": positions,
            "block_mask": block_mask(seq_index), "sequence_index": seq_index, "last_position": last}


def _pack_shared_prompt(pairs: list[TokenizedPair], pad_id: int, capacity: int) -> dict:
    import torch

    segments = [p.prompt_ids + p.chosen_ids + p.rejected_ids for p in pairs]
    capacity = max(capacity, max(len(s) for s in segments))
    rows = _first_fit_decreasing([len(s) for s in segments], capacity)
    width = max(sum(len(segments[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    part = torch.zeros(shape, dtype=torch.long)
    last = torch.zeros((2 * len(pairs), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            p = pairs[i]
            n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            n = n_p + n_c + n_r
            ids[r, start : start + n] = torch.tensor(segments[i])
            mask[r, start : start + n] = 1
            positions[r, start : start + n] = torch.cat(
                [torch.arange(n_p), torch.arange(n_p, n_p + n_c), torch.arange(n_p, n_p + n_r)])
            segment[r, start : start + n] = i
            part[r, start + n_p : start + n_p + n_c] = 1
            part[r, start + n_p + n_c : start + n] = 2
            last[i] = torch.tensor([r, start + n_p + n_c - 1])
            last[len(pairs) + i] = torch.tensor([r, start + n - 1])
            start += n
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "block_mask": block_mask(segment, part), "last_position": last}


def _shared_pairs_row(pairs: list[TokenizedPair], pad_id: int, row_tokens: int = 512) -> dict:
    """Rows [common prefix | prompt i | chosen i | rejected i | prompt i+1 | ...] of at most `row_tokens`
    tokens (core.data.rows_under), for DPO's log-probs.

    The common prefix (the tokens every prompt of the micro-batch starts with: a chat template's system
    prompt) runs once a row and each prompt once for its pair. A prompt token sees the prefix and its own
    prompt; a response token also sees its own response's earlier tokens, never the other response or another
    pair; positions continue as in the pair's own sequences. So each target's log-prob is the one it has in
    its padded row. Targets are read where they are predicted (`pred_index` (row, position), as
    core.modeling reads grouped rollouts): a response's first token from its prompt's last token.
    `target_owner` names each target's sequence (chosen i -> i, rejected i -> B + i).
    """
    import torch

    from alignment.core.data import branch_mask, branch_rows, rows_under

    B = len(pairs)
    first = pairs[0].prompt_ids
    p = min(len(x.prompt_ids) for x in pairs) - 1  # each pair keeps a prompt token of its own
    n = 0
    while n < p and all(x.prompt_ids[n] == first[n] for x in pairs):
        n += 1
    sizes = [len(x.prompt_ids) - n + len(x.chosen_ids) + len(x.rejected_ids) for x in pairs]
    preds, targets, owners, built = [], [], [], []
    for r, row in enumerate(rows_under(sizes, n, row_tokens)):
        ids, positions, owner_pair, branch = list(first[:n]), list(range(n)), [-1] * n, [0] * n
        for i in row:
            x = pairs[i]
            rest = x.prompt_ids[n:]
            ids += rest
            positions += range(n, len(x.prompt_ids))
            owner_pair += [i] * len(rest)
            branch += [0] * len(rest)
            prompt_last = len(ids) - 1
            for b, response in ((1, x.chosen_ids), (2, x.rejected_ids)):
                start = len(ids)
                for t, token in enumerate(response):
                    preds.append((r, prompt_last if t == 0 else start + t - 1))
                    targets.append(token)
                    owners.append(i if b == 1 else B + i)
                ids += response
                positions += range(len(x.prompt_ids), len(x.prompt_ids) + len(response))
                owner_pair += [i] * len(response)
                branch += [b] * len(response)
        built.append((ids, positions, owner_pair, branch))
    ids_t, positions_t, pair_of, branch_of = branch_rows(built, pad_id)
    return {"input_ids": ids_t, "attention_mask": (pair_of != -2).long(), "position_ids": positions_t,
            "block_mask": branch_mask(pair_of, branch_of),
            "pred_index": torch.tensor(preds, dtype=torch.long).view(-1, 2),
            "targets": torch.tensor(targets, dtype=torch.long), "target_owner": torch.tensor(owners, dtype=torch.long)}
