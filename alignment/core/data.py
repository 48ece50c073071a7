"""Reading rows, tokenizing SFT examples, packing, batching.

Row sources: local .jsonl / .json / .parquet files, a `datasets` hub name, or
`builtin:<name>` for the built-in task's files (written by the project itself,
see alignment.evaluate.task). Every row keeps its origin (file, line) so a malformed row
is reported as ``file:line: field ...``.

SFT shapes: chat ``messages``; ``prompt``/``completion`` as strings or message
lists; plain ``text``. Rendering and tokenization go through alignment.core.text (the
one path every stage, scorer and generator shares): the loss covers each assistant
turn up to its end-of-turn token, prompt and response are tokenized as generation sees
them, and exactly one BOS is present when the tokenizer uses one.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from alignment.core import text

IGNORE = -100


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass
class Row:
    data: dict
    origin: str  # "path:line" (1-based line) or "hub-name[index]"
    error: str | None = None  # set for an unreadable line kept so that `on_bad_row: skip` can count it

    def check(self) -> None:
        if self.error:
            raise DataError(self.error)


@dataclass
class DataReport:
    """Counts shown before training: nothing is dropped without being counted."""

    name: str
    rows_read: int = 0
    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped_bad_rows: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # kept rows with something worth knowing

    def skip(self, reason: str, message: str) -> None:
        self.skipped_bad_rows[reason] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(message)

    def format(self) -> str:
        lines = [
            f"data report [{self.name}]: rows read {self.rows_read}, kept {self.examples}, "
            f"tokens {self.tokens}, trainable tokens {self.trainable_tokens}, truncated {self.truncated}"
        ]
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  dropped {count:>6}  {reason}")
        for reason, count in sorted(self.skipped_bad_rows.items()):
            lines.append(f"  skipped {count:>6}  malformed: {reason}")
        for reason, count in sorted(self.notes.items()):
            lines.append(f"  kept    {count:>6}  {reason}")
        for message in self.first_errors:
            lines.append(f"    e.g. {message}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "examples": self.examples,
            "tokens": self.tokens,
            "trainable_tokens": self.trainable_tokens,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            "skipped_bad_rows": dict(self.skipped_bad_rows),
            "notes": dict(self.notes),
        }


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


SOURCES: dict[str, Callable[[str], str]] = {}


def register_source(prefix: str, resolve: Callable[[str], str]) -> None:
    """Make `data.train: PREFIX:NAME` resolve to a file through resolve(NAME) (the built-in task's
    `builtin:` files are registered by alignment.builtin)."""
    SOURCES[prefix] = resolve


def resolve_source(source: str) -> str:
    prefix, _, name = source.partition(":")
    if name and prefix in SOURCES:
        return SOURCES[prefix](name)
    return source


def read_rows(source: str, split: str = "train", on_bad_row: str = "error") -> list[Row]:
    """All rows of a file or hub dataset, each with its origin for error messages.

    With on_bad_row="skip", an unreadable JSONL line becomes a Row carrying its error,
    which the tokenizing step counts as skipped; with "error" it raises here.
    """
    resolved = resolve_source(source)
    path = Path(resolved).expanduser()
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffix in (".jsonl", ".jsonl.gz"):
            return list(_read_jsonl(path, lenient=on_bad_row == "skip"))
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return [Row(r, f"{path}:row {i + 1}") for i, r in enumerate(table.to_pylist())]
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
    if resolved.startswith((".", "/", "~")) or resolved.endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"data file not found: {resolved}")
    import datasets

    dataset = datasets.load_dataset(resolved, split=split)
    return [Row(dict(r), f"{resolved}[{split}][{i}]") for i, r in enumerate(dataset)]


def _read_jsonl(path: Path, lenient: bool = False) -> Iterator[Row]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                error = None if isinstance(data, dict) else f"{path}:{number}: expected a JSON object, got {type(data).__name__}"
            except json.JSONDecodeError as exc:
                data, error = {}, f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})"
            if error and not lenient:
                raise DataError(error)
            yield Row(data if not error else {}, f"{path}:{number}", error)


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict):  # column-oriented {"col": [...]} or {"data": [...]}
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        else:
            lengths = {k: len(v) if isinstance(v, list) else None for k, v in data.items()}
            if any(n is None for n in lengths.values()) or len(set(lengths.values())) > 1:
                shown = ", ".join(f"'{k}': {'not a list' if n is None else n}" for k, n in lengths.items())
                raise DataError(f"{path}: a column-oriented JSON object needs lists of one length per column; "
                                f"got {shown}")
            keys = list(data)
            data = [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects")
    return [Row(r, f"{path}:item {i + 1}") for i, r in enumerate(data)]


def split_rows(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(rows) * eval_fraction))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


# ---------------------------------------------------------------------------
# Validation helpers (shared with preference data)
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    origin: str = ""
    resplit: bool = False  # a token would have merged across a prompt/response boundary (alignment.core.text)

    @property
    def num_trainable(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def sft_example(row: Row, tokenizer, fmt: str, assistant_only: bool) -> Example:
    """One row -> token ids and labels (IGNORE where no loss), through alignment.core.text."""
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
            report.skip(str(exc).split(": ", 1)[-1].split(";")[0][:60], str(exc))
            continue
        if example.resplit:
            report.notes["response re-tokenized at the prompt boundary"] += 1
        if len(example.input_ids) > data_cfg.max_length:
            if data_cfg.overlong == "drop":
                report.dropped["longer than max_length"] += 1
                continue
            report.truncated += 1
            example.input_ids = example.input_ids[: data_cfg.max_length]
            example.labels = example.labels[: data_cfg.max_length]
        # The first token is never a target (nothing predicts it).
        if sum(1 for t in example.labels[1:] if t != IGNORE) == 0:
            report.dropped["no trainable token (after truncation)"] += 1
            continue
        examples.append(example)
        report.tokens += len(example.input_ids)
        report.trainable_tokens += sum(1 for t in example.labels[1:] if t != IGNORE)
    report.examples = len(examples)
    return examples


# ---------------------------------------------------------------------------
# Packing and batching
# ---------------------------------------------------------------------------


@dataclass
class PackedRow:
    """Several examples laid end to end; `lengths` marks their boundaries."""

    input_ids: list[int]
    labels: list[int]
    lengths: list[int]


def pack_examples(examples: list[Example], max_length: int) -> list[PackedRow]:
    """First-fit-decreasing packing into rows of at most max_length tokens (order-stable per seed)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[PackedRow] = []
    space: list[int] = []
    for i in order:
        ex = examples[i]
        n = len(ex.input_ids)
        # An example's first token is not a target inside a pack: it would be predicted
        # from the previous, unrelated example.
        ex = Example(ex.input_ids, [IGNORE] + ex.labels[1:], ex.origin)
        for b, free in enumerate(space):
            if free >= n:
                bins[b].input_ids += ex.input_ids
                bins[b].labels += ex.labels
                bins[b].lengths.append(n)
                space[b] -= n
                break
        else:
            bins.append(PackedRow(list(ex.input_ids), list(ex.labels), [n]))
            space.append(max_length - n)
    return bins


def block_mask(segment, part=None):
    """Attention allowed [R, 1, W, W] in packed rows: same segment (segment[r, t] >= 0; -1 = padding),
    causal, and when `part` is given (0 = a shared prompt, 1, 2, ... = responses after it) only keys in the
    prompt or in the query's own part; padding queries see themselves (a softmax over nothing would be NaN)."""
    import torch

    width = segment.shape[1]
    allowed = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed &= torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()[None]
    if part is not None:
        allowed &= (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])
    return (allowed | torch.eye(width, dtype=torch.bool, device=segment.device)[None])[:, None]


def branch_mask(owner, branch):
    """Attention allowed [R, 1, W, W] in rows of shared-prefix layouts: owner[r, t] is -1 on the prefix that
    every item of the row shares, the item's index on its own tokens, -2 on padding; branch[r, t] is 0 on
    an item's prompt and 1, 2, ... on its responses. A token sees, causally, the prefix, its own item's
    prompt and its own response; padding sees itself (a softmax over nothing would be NaN)."""
    import torch

    width = owner.shape[1]
    q_owner, k_owner = owner[:, :, None], owner[:, None, :]
    same = (q_owner == k_owner) & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
    allowed = ((k_owner == -1) | same) & (q_owner != -2) & (k_owner != -2)
    allowed &= torch.ones(width, width, dtype=torch.bool, device=owner.device).tril()[None]
    allowed |= torch.eye(width, dtype=torch.bool, device=owner.device)[None]
    return allowed[:, None]


def branch_rows(built: list[tuple[list, list, list, list]], pad_id: int):
    """Rows of a shared-prefix layout as tensors: each built row is (token ids, positions, owner, branch) as
    branch_mask reads them; returns (input_ids, position_ids, owner, branch) [R, W], right-padded (owner -2)."""
    import torch

    width = max(len(b[0]) for b in built)
    shape = (len(built), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    owner = torch.full(shape, -2, dtype=torch.long)
    branch = torch.zeros(shape, dtype=torch.long)
    for r, (row, pos, own, br) in enumerate(built):
        n = len(row)
        ids[r, :n], positions[r, :n] = torch.tensor(row), torch.tensor(pos)
        owner[r, :n], branch[r, :n] = torch.tensor(own), torch.tensor(br)
    return ids, positions, owner, branch


def collate(items: list, pad_id: int):
    """Right-pad a micro-batch. Packed rows get position ids and a block-diagonal causal mask.

    Returns a dict with input_ids, labels (IGNORE on padding), attention_mask and,
    for packed rows, position_ids plus a 4D float mask that stops attention at
    example boundaries (works with eager and SDPA attention, on CPU too).
    """
    import torch

    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it.input_ids)
        ids[b, :n] = torch.tensor(it.input_ids)
        labels[b, :n] = torch.tensor(it.labels)
        mask[b, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if items and isinstance(items[0], PackedRow):
        positions = torch.zeros((len(items), width), dtype=torch.long)
        segment = torch.full((len(items), width), -1, dtype=torch.long)
        for b, it in enumerate(items):
            start = 0
            for k, n in enumerate(it.lengths):
                positions[b, start : start + n] = torch.arange(n)
                segment[b, start : start + n] = k
                start += n
        batch["position_ids"] = positions
        batch["block_mask"] = block_mask(segment)
    return batch


def shared_prefix_length(items: list) -> int:
    """Tokens every example of a micro-batch starts with and that may be computed once: the longest common
    prefix, cut so that it holds no target and each example keeps at least its first token after it, and
    that first token is not a target either (in a shared row it would be predicted from another example)."""
    if len(items) < 2:
        return 0
    first = items[0].input_ids
    n = min(len(it.input_ids) for it in items) - 1
    p = 0
    while p < n and all(it.input_ids[p] == first[p] for it in items):
        p += 1
    while p > 0 and any(t != IGNORE for it in items for t in it.labels[1 : p + 1]):
        p -= 1
    return p


def _fill(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive items into rows of at most `budget` (an item longer than that alone in its row)."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > budget:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def rows_under(lengths: list[int], prefix: int, cap: int) -> list[list[int]]:
    """Consecutive items (their lengths after a shared prefix) grouped into as few rows as fit `cap` tokens
    with the prefix in front of each, and balanced: every row is padded to the widest, so 520 tokens under
    a 512 cap make two rows of about 272, not 512 + 8 padded to 1,024. Attention over a shared row is
    quadratic in its width, hence the cap; an item longer than it gets a row of its own."""
    room = max(1, cap - prefix)
    count = len(_fill(lengths, room))  # filling up to the cap gives the fewest rows
    low, high = max(1, math.ceil(sum(lengths) / count)), room
    while low < high:  # the smallest row budget that still needs only `count` rows
        mid = (low + high) // 2
        if len(_fill(lengths, mid)) <= count:
            high = mid
        else:
            low = mid + 1
    return _fill(lengths, low)


def collate_shared_prefix(items: list, pad_id: int, min_prefix: int = 8, row_tokens: int = 512):
    """Rows [prefix | rest i | rest i+1 | ...] of at most `row_tokens` tokens when the examples share a prefix
    of at least `min_prefix` tokens (a chat template's system prompt), else `collate`.

    Each rest sees its row's prefix and its own earlier tokens only (branch_mask) and its positions
    continue from the prefix's end, so every target's log-prob is the one it has in its own padded row,
    while the prefix runs once a row instead of once an example (SmolLM2's default system prompt is 24 of the
    built-in task's 54 tokens a demonstration). Targets come in the order of the padded batch.
    `example_tokens` counts the tokens of the examples as given.
    """
    import torch

    p = 0 if isinstance(items[0], PackedRow) else shared_prefix_length(items)
    if p < min_prefix:
        batch = collate(items, pad_id)
        batch["example_tokens"] = batch["attention_mask"].sum()
        return batch
    built, labels = [], []
    for row in rows_under([len(it.input_ids) - p for it in items], p, row_tokens):
        ids, row_labels, positions, owner = list(items[0].input_ids[:p]), [IGNORE] * p, list(range(p)), [-1] * p
        for i in row:
            it = items[i]
            rest = len(it.input_ids) - p
            ids += it.input_ids[p:]
            row_labels += it.labels[p:]
            positions += range(p, p + rest)
            owner += [i] * rest
        built.append((ids, positions, owner, [0] * len(ids)))
        labels.append(row_labels)
    ids_t, positions_t, owner_t, branch_t = branch_rows(built, pad_id)
    labels_t = torch.full(ids_t.shape, IGNORE, dtype=torch.long)
    for r, row_labels in enumerate(labels):
        labels_t[r, : len(row_labels)] = torch.tensor(row_labels)
    return {"input_ids": ids_t, "labels": labels_t, "attention_mask": (owner_t != -2).long(),
            "position_ids": positions_t, "block_mask": branch_mask(owner_t, branch_t),
            "example_tokens": torch.tensor(sum(len(it.input_ids) for it in items))}


def count_targets(items: list) -> int:
    """Number of supervised next-token targets (labels shifted by one)."""
    return sum(sum(1 for t in it.labels[1:] if t != IGNORE) for it in items)


class GlobalBatchSampler:
    """Deterministic epoch shuffles, cut into global batches, each split across ranks and micro-batches.

    Global batch `step` of an epoch holds the same examples whatever the world
    size; rank r takes micro-batch m from slots [(m * world + r) * micro, +micro).
    An epoch's incomplete last global batch is left out (a different `tail` examples each epoch, as
    the order is reshuffled); the stages print :meth:`describe` so it is never silent.
    """

    def __init__(self, num_items: int, layout, seed: int, shuffle: bool = True):
        self.num_items = num_items
        self.layout = layout
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_items // layout.global_batch_size
        self.tail = num_items % layout.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"only {num_items} training examples, fewer than one global batch "
                f"(train.global_batch_size = {layout.global_batch_size})"
            )

    def describe(self) -> str:
        g = self.layout.global_batch_size
        text = (f"epoch: {self.steps_per_epoch} steps of {g} = {self.steps_per_epoch * g} of {self.num_items} "
                "training examples")
        if self.tail:
            text += (f"; {self.tail} left out of each epoch (an incomplete global batch; a different {self.tail} each "
                     f"epoch, the order is reshuffled). A train.global_batch_size dividing {self.num_items} uses all.")
        return text

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Item indices of this rank's micro-batches for global step `step` (0-based, across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        g = self.layout.global_batch_size
        batch = order[within * g : (within + 1) * g]
        micro, world = self.layout.micro_batch_size, self.layout.world_size
        return [
            batch[(m * world + rank) * micro : (m * world + rank + 1) * micro]
            for m in range(self.layout.grad_accum_steps)
        ]
