"""Unpaired preference rows for KTO: one answer with a label, good or bad (TRL's unpaired preference type).

    {"prompt": "What is 2+2?", "completion": "4", "label": true}      (or message lists)

A label is a boolean, 1/0, or the words true/false, good/bad, up/down (a thumbs export, a CSV cell). A preference
row (any shape alignment.data.preference reads) is two such rows: its chosen answer labelled good and its rejected
one bad, as TRL's `unpair_preference_dataset` splits them. Answers are tokenized as a policy reads them (the
template's end of turn, no suffix), the prompt kept from its end when prompt + answer is too long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignment.data import text
from alignment.data.preference import PairRejected, to_pair
from alignment.data.report import DataReport
from alignment.data.shapes import check_messages, check_string, shape_of, unknown_shape
from alignment.data.sources import DataError, Row

TRUE, FALSE = ("true", "1", "good", "up", "yes"), ("false", "0", "bad", "down", "no")


@dataclass
class Answer:
    prompt: Any
    completion: Any
    desirable: bool
    origin: str


@dataclass
class TokenizedAnswer:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    origin: str


def parse_label(value: Any, origin: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise DataError(f"{origin}: field 'label' must be true/false (or 1/0, good/bad, up/down), got {value!r}")


def to_answers(row: Row) -> list[Answer]:
    """The answers of one row: an unpaired row's one, or a preference row's two."""
    row.check()
    data, origin = row.data, row.origin
    if shape_of(data, "unpaired"):
        prompt, completion = data["prompt"], data["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = (check_messages(prompt, origin, "prompt") if isinstance(prompt, list) else
                      [{"role": "user", "content": check_string(prompt, origin, "prompt")}])
            completion = (check_messages(completion, origin, "completion") if isinstance(completion, list) else
                          [{"role": "assistant", "content": check_string(completion, origin, "completion")}])
        else:
            prompt, completion = check_string(prompt, origin, "prompt"), check_string(completion, origin, "completion")
        text_of = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        if not text_of.strip():
            raise PairRejected("empty response")
        return [Answer(prompt, completion, parse_label(data["label"], origin), origin)]
    if shape_of(data, "preference") is None:
        raise unknown_shape(data, origin, "unpaired")
    pair = to_pair(row)
    return [Answer(pair.prompt, pair.chosen, True, origin), Answer(pair.prompt, pair.rejected, False, origin)]


def tokenize_answer(answer: Answer, tokenizer, max_length: int, max_prompt_length: int | None,
                    report: DataReport) -> TokenizedAnswer:
    try:
        enc = text.encode(tokenizer, answer.prompt, answer.completion)
    except text.TemplateError as exc:
        raise DataError(f"{answer.origin}: {exc}") from None
    prompt_ids, (completion_ids,), cut = text.fit(enc.prompt_ids, [enc.response_ids], max_length, max_prompt_length,
                                                  tokenizer.bos_token_id)
    report.truncated += cut
    if not completion_ids:
        raise PairRejected("a response is empty after truncation")
    return TokenizedAnswer(prompt_ids, completion_ids, answer.desirable, answer.origin)


def load_answers(rows: list[Row], tokenizer, data_cfg, max_prompt_length: int | None,
                 report: DataReport) -> list[TokenizedAnswer]:
    """Rows -> tokenized labelled answers; malformed rows raise (or are skipped and counted), unusable ones are
    dropped and located."""
    out = []
    report.rows_read += len(rows)
    for row in rows:
        try:
            answers = [tokenize_answer(a, tokenizer, data_cfg.max_length, max_prompt_length, report)
                       for a in to_answers(row)]
        except PairRejected as exc:
            report.drop(exc.reason, row.origin)
            continue
        except DataError as exc:
            if data_cfg.on_bad_row == "error":
                raise
            report.skip(str(exc).split(": ", 1)[-1][:60], str(exc), row.origin)
            continue
        out += answers
        report.tokens += sum(len(a.prompt_ids) + len(a.completion_ids) for a in answers)
    report.examples = len(out)
    return out
