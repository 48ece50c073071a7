"""Where rows come from: local files, `datasets` hub names, `builtin:` names, each row with its origin.

Sources: local .jsonl / .json / .parquet files, a `datasets` hub name, or `builtin:<name>` for the
built-in task's files (registered by alignment.builtin). Every row keeps its origin (file, line) so a
malformed row is reported as ``file:line: field ...``.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from alignment.errors import UserError


class DataError(UserError):
    """Bad input data; the message names file, line and field."""


@dataclass
class Row:
    data: dict
    origin: str  # "path:line" (1-based line) or "hub-name[index]"
    error: str | None = None  # set for an unreadable line kept so that `on_bad_row: skip` can count it

    def check(self) -> None:
        if self.error:
            raise DataError(self.error)


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


def read_splits(d, seed: int) -> tuple[list[Row], list[Row]]:
    """Train and eval rows as a recipe's data section `d` says (file/hub/builtin, split, row caps)."""
    rows = read_rows(d.train, d.split, d.on_bad_row)
    eval_rows = read_rows(d.eval, "test" if d.split == "train" else d.split, d.on_bad_row) if d.eval else []
    if d.eval_fraction > 0:
        rows, eval_rows = split_rows(rows, d.eval_fraction, seed)
    if d.skip_rows and d.skip_rows >= len(rows):
        raise DataError(f"{d.train}: data.skip_rows ({d.skip_rows}) leaves none of its {len(rows)} training rows")
    rows = rows[d.skip_rows:]
    rows = rows[: d.max_rows] if d.max_rows is not None else rows
    eval_rows = eval_rows[: d.max_eval_rows] if d.max_eval_rows is not None else eval_rows
    return rows, eval_rows


