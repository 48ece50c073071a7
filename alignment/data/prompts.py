"""RL prompts: rows with a `prompt` (a string or a message list; alignment.data.shapes.prompt_of) and any fields
reward functions read."""

from __future__ import annotations

from dataclasses import dataclass

from alignment.data import text
from alignment.data.report import DataReport
from alignment.data.shapes import prompt_of
from alignment.data.sources import DataError


@dataclass
class PromptSet:
    prompts: list          # chat messages or raw text, as the rows give them
    ids: list[list[int]]   # text.prompt_ids of each
    rows: list[dict]       # the rows (gold specs and any other fields reward functions read)


def load_prompts(rows, tokenizer, max_prompt_length: int, report: DataReport, on_bad_row: str) -> PromptSet:
    out = PromptSet([], [], [])
    report.rows_read += len(rows)
    for row in rows:
        try:
            row.check()
            prompt = prompt_of(row.data, row.origin)
            ids = text.prompt_ids(tokenizer, prompt)
        except (DataError, text.TemplateError) as exc:
            if on_bad_row == "error":
                raise DataError(str(exc)) from None
            report.skip(str(exc).split(": ", 1)[-1][:60], str(exc), row.origin)
            continue
        if len(ids) > max_prompt_length:
            report.drop("prompt longer than ppo.max_prompt_length", row.origin)
            continue
        out.prompts.append(prompt)
        out.ids.append(ids)
        out.rows.append(row.data)
        report.tokens += len(ids)
    report.examples = len(out.ids)
    return out


