"""The data report: every row read is counted as kept, truncated, dropped (with the reason) or skipped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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


