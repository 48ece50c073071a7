"""Where rows come from: local files, `datasets` hub names, `builtin:` names, each row with its origin.

Sources: local .jsonl / .json / .parquet files, a `datasets` hub name, or `builtin:<name>` for the
built-in task's files (registered by alignment.builtin). Every row keeps its origin (file, line) so a
malformed row is reported as ``file:line: field ...``.
"""

from __future__ import annotations

import csv
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


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv", ".gz", ".arrow")


def looks_local(source: str) -> bool:
    """Whether `source` can only be a local path: it starts like one, ends with a data file's extension, or has
    more separators than a hub name ("name" or "org/name") can."""
    return source.startswith((".", "/", "~")) or source.lower().endswith(DATA_SUFFIXES) or source.count("/") > 1


def read_rows(source: str, split: str = "train", on_bad_row: str = "error", subset: str | None = None) -> list[Row]:
    """All rows of a file, a `datasets` folder or a hub dataset, each with its origin for error messages.

    Files: JSON lines (.jsonl, .ndjson, .jsonl.gz, and any other extension whose lines are JSON objects), JSON
    (a list of objects, a column-oriented object, or JSON lines in a .json file as `Dataset.to_json` writes
    them), Parquet, CSV/TSV. Folders written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (the
    `split` of a DatasetDict). Anything else is a hub dataset name (`subset` is its configuration).
    With on_bad_row="skip", an unreadable JSON line becomes a Row carrying its error, which the tokenizing step
    counts as skipped; with "error" it raises here.
    """
    resolved = resolve_source(source)
    path = Path(resolved).expanduser()
    if path.is_dir():
        return _read_dataset_folder(path, split)
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".jsonl.gz"):
            return list(_read_jsonl(path, lenient=on_bad_row == "skip"))
        if suffix == ".json":
            return _read_json(path, lenient=on_bad_row == "skip")
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # heavy, and only for Parquet files

            table = pq.read_table(path)
            return [Row(r, f"{path}:row {i + 1}") for i, r in enumerate(table.to_pylist())]
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
        if _first_line_is_an_object(path):
            return list(_read_jsonl(path, lenient=on_bad_row == "skip"))
        raise DataError(f"{path}: cannot read a file of type {path.suffix or '(no extension)'!r}: use JSON lines, "
                        "JSON, Parquet, CSV/TSV, or a folder written by datasets' save_to_disk")
    if looks_local(resolved):
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataError(f"data file not found: {resolved}{where}")
    return _read_hub(resolved, subset, split)


def _read_dataset_folder(path: Path, split: str) -> list[Row]:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json, "
                        "state.json or dataset_dict.json); give a data file or such a folder")
    import datasets  # heavy, and only for datasets' folders and hub names

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: a DatasetDict without a split {split!r}; it has {', '.join(loaded)} "
                            "(data.split / data.eval_split choose one)")
        loaded, origin = loaded[split], f"{path}[{split}]"
    else:
        origin = str(path)
    return [Row(dict(r), f"{origin}:row {i + 1}") for i, r in enumerate(loaded)]


def _read_hub(name: str, subset: str | None, split: str) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # datasets raises many types (not found, offline, no such split or configuration)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{name}: no such local file or folder (relative to {Path.cwd()}), and it cannot be loaded "
                        f"as a hub dataset{f' (configuration {subset!r})' if subset else ''}, split {split!r}: "
                        f"{type(exc).__name__}: {first[:300]}. Offline, use a local file, or set "
                        "HF_DATASETS_OFFLINE=1 with the dataset in the local cache") from None
    origin = f"{name}{f'/{subset}' if subset else ''}[{split}]"
    return [Row(dict(r), f"{origin}:row {i + 1}") for i, r in enumerate(dataset)]


def _first_line_is_an_object(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        rows = []
        for record in reader:
            if None in record:  # more cells than the header has names
                raise DataError(f"{path}:{reader.line_num}: {len(record[None])} more cells than the header's "
                                f"{len(reader.fieldnames or [])} columns")
            rows.append(Row(dict(record), f"{path}:{reader.line_num}"))
        return rows


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


def _read_json(path: Path, lenient: bool = False) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _first_line_is_an_object(path):  # JSON lines, as Dataset.to_json writes
            return list(_read_jsonl(path, lenient))
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


class Rows(list):
    """Rows of one split, and where they came from, as the data report names it."""

    def __init__(self, rows=(), described: str = ""):
        super().__init__(rows)
        self.described = described


def read_splits(d, seed: int) -> tuple[Rows, Rows]:
    """Train and eval rows as a recipe's data section `d` says (sources, split, held-out split, row caps), each
    with a line naming where it came from ("10% of my_pairs.jsonl, seed 0, 57 rows"). `d.eval` is a source or None
    here (alignment.core.recipes resolves `auto` when the recipe loads)."""
    rows = read_rows(d.train, d.split, d.on_bad_row, d.subset)
    train_from = d.train
    eval_rows: list[Row] = []
    eval_from = "none (data.eval is null)"
    if d.eval:
        eval_split = d.eval_split or ("test" if d.split == "train" else d.split)
        eval_rows = read_rows(d.eval, eval_split, d.on_bad_row, d.subset)
        eval_from = d.eval
    elif d.eval_fraction:
        rows, eval_rows = split_rows(rows, d.eval_fraction, seed)
        eval_from = f"{d.eval_fraction:.0%} of {d.train}, seed {seed}"
        train_from = f"{d.train} less the held-out {d.eval_fraction:.0%}"
    if d.skip_rows and d.skip_rows >= len(rows):
        raise DataError(f"{d.train}: data.skip_rows ({d.skip_rows}) leaves none of its {len(rows)} training rows")
    if d.skip_rows:
        rows, train_from = rows[d.skip_rows:], f"{train_from} from row {d.skip_rows + 1}"
    if d.max_rows is not None and d.max_rows < len(rows):
        rows, train_from = rows[: d.max_rows], f"{train_from}, the first {d.max_rows}"
    if d.max_eval_rows is not None and d.max_eval_rows < len(eval_rows):
        eval_rows, eval_from = eval_rows[: d.max_eval_rows], f"{eval_from}, the first {d.max_eval_rows}"
    return (Rows(rows, f"{train_from}: {len(rows)} rows"),
            Rows(eval_rows, f"{eval_from}: {len(eval_rows)} rows" if eval_rows else eval_from))
