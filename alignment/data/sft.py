"""SFT examples: one row (chat ``messages``, ``prompt``/``completion``, or plain ``text``) to token ids and
labels, through the one tokenization path (alignment.data.text): the loss covers each assistant turn up to
its end-of-turn token, prompt and response are tokenized as generation sees them, and exactly one BOS is
present when the tokenizer uses one.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.data import text
from alignment.data.layout import IGNORE
from alignment.data.report import DataReport
from alignment.data.shapes import check_messages, check_string, detect_sft_format
from alignment.data.sources import DataError, Row


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    origin: str = ""
    resplit: bool = False  # a token would have merged across a prompt/response boundary (alignment.data.text)

    @property
    def num_trainable(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def sft_example(row: Row, tokenizer, fmt: str, assistant_only: bool) -> Example:
    """One row -> token ids and labels (IGNORE where no loss), through alignment.data.text."""
    row.check()
    data, origin = row.data, row.origin
    shape = detect_sft_format(data, origin) if fmt == "auto" else fmt
    try:
        if shape == "messages":
            messages = check_messages(data.get("messages", data.get("conversations")), origin, "messages")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{origin}: field 'messages' has no assistant turn")
            rendered, spans = text.chat_spans(tokenizer, messages)
        elif shape == "prompt_completion":
            prompt, completion = data.get("prompt"), data.get("completion")
            if isinstance(prompt, list) or isinstance(completion, list):
                prompt_msgs = check_messages(prompt, origin, "prompt")
                completion_msgs = check_messages(completion, origin, "completion")
                rendered, spans = text.chat_spans(tokenizer, prompt_msgs + completion_msgs, len(prompt_msgs))
            else:
                prompt = check_string(prompt, origin, "prompt")
                completion = check_string(completion, origin, "completion")
                eos = tokenizer.eos_token or ""
                if eos and not completion.endswith(eos):
                    completion = completion + eos
                rendered = prompt + completion
                spans = [(len(prompt), len(rendered))]
        elif shape == "text":
            rendered = check_string(data.get("text"), origin, "text")
            eos = tokenizer.eos_token or ""
            if eos and not rendered.endswith(eos):
                rendered = rendered + eos
            spans = [(0, len(rendered))]
            assistant_only = True  # every token of plain text is trainable
        else:
            raise DataError(f"{origin}: unknown SFT format {shape!r}")
    except text.TemplateError as exc:
        raise DataError(f"{origin}: {exc}") from None
    ids, inside, resplit = text.encode_spans(tokenizer, rendered, spans if assistant_only else [(0, len(rendered))])
    labels = [token if keep else IGNORE for token, keep in zip(ids, inside)]
    return Example(ids, labels, origin, resplit)


def build_sft_examples(rows: list[Row], tokenizer, data_cfg, assistant_only: bool, report: DataReport) -> list[Example]:
    """Tokenize, apply the over-long policy, drop rows with nothing to learn; all counted."""
    examples = []
    report.rows_read += len(rows)
    for row in rows:
        try:
            example = sft_example(row, tokenizer, data_cfg.format, assistant_only)
        except DataError as exc:
            if data_cfg.on_bad_row == "error":
                raise
            report.skip(str(exc).split(": ", 1)[-1].split(";")[0][:60], str(exc), row.origin)
            continue
        if example.resplit:
            report.notes["response re-tokenized at the prompt boundary"] += 1
        if len(example.input_ids) > data_cfg.max_length:
            if data_cfg.overlong == "drop":
                report.drop("longer than max_length", row.origin)
                continue
            report.truncated += 1
            example.input_ids = example.input_ids[: data_cfg.max_length]
            example.labels = example.labels[: data_cfg.max_length]
        # The first token is never a target (nothing predicts it).
        if sum(1 for t in example.labels[1:] if t != IGNORE) == 0:
            report.drop("no trainable token (after truncation)", row.origin)
            continue
        examples.append(example)
        report.tokens += len(example.input_ids)
        report.trainable_tokens += sum(1 for t in example.labels[1:] if t != IGNORE)
    report.examples = len(examples)
    return examples


def count_targets(items: list) -> int:
    """Number of supervised next-token targets (labels shifted by one)."""
    return sum(sum(1 for t in it.labels[1:] if t != IGNORE) for it in items)


