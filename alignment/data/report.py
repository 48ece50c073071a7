"""The data report: every row read is counted as kept, truncated, dropped (with the reason) or skipped, and every
row left out is located (file:line), so nothing is lost silently."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SHOWN_PER_REASON = 3  # rows located in the printed report per reason; all of them go to dropped.jsonl


@dataclass
class DataReport:
    """Counts shown before training: nothing is dropped without being counted and located."""

    name: str
    source: str = ""
    """Where the rows came from (alignment.data.sources.Rows.described)."""
    rows_read: int = 0
    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped_bad_rows: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # kept rows with something worth knowing
    left_out: list[dict] = field(default_factory=list)  # every dropped or skipped row: reason, origin

    def drop(self, reason: str, origin: str) -> None:
        """A well-formed row that cannot be trained on (empty, identical, too long, ...)."""
        self.dropped[reason] += 1
        self.left_out.append({"split": self.name, "reason": reason, "origin": origin})

    def skip(self, reason: str, message: str, origin: str = "") -> None:
        """A malformed row, skipped under data.on_bad_row: skip."""
        self.skipped_bad_rows[reason] += 1
        self.left_out.append({"split": self.name, "reason": f"malformed: {reason}", "origin": origin,
                              "message": message})
        if len(self.first_errors) < 5:
            self.first_errors.append(message)

    def format(self) -> str:
        lines = [
            f"data report [{self.name}]{f' from {self.source}' if self.source else ''}: rows read {self.rows_read}, "
            f"kept {self.examples}, tokens {self.tokens}, trainable tokens {self.trainable_tokens}, "
            f"truncated {self.truncated}"
        ]
        for reason, count in sorted(self.dropped.items()):
            where = [x["origin"] for x in self.left_out if x["reason"] == reason][:SHOWN_PER_REASON]
            more = ", ..." if count > len(where) else ""
            lines.append(f"  dropped {count:>6}  {reason}: {', '.join(where)}{more}")
        for reason, count in sorted(self.skipped_bad_rows.items()):
            lines.append(f"  skipped {count:>6}  malformed: {reason}")
        for reason, count in sorted(self.notes.items()):
            lines.append(f"  kept    {count:>6}  {reason}")
        for message in self.first_errors:
            lines.append(f"    e.g. {message}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "examples": self.examples,
            "tokens": self.tokens,
            "trainable_tokens": self.trainable_tokens,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            "skipped_bad_rows": dict(self.skipped_bad_rows),
            "notes": dict(self.notes),
        }


def write_left_out(reports: list[DataReport], output_dir: str | Path) -> Path | None:
    """output_dir/dropped.jsonl: one line per row a report left out (split, reason, origin); None when none was."""
    rows = [x for report in reports for x in report.left_out]
    path = Path(output_dir) / "dropped.jsonl"
    if not rows:
        path.unlink(missing_ok=True)
        return None
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path
