"""Reward functions for `ppo.rewards` (source `module:function`), called as function(prompts, responses, rows)
-> one float per response: `prompts` as the prompt rows give them, `responses` the decoded texts, `rows` the
prompt rows themselves (any extra field, e.g. `gold`, is there). Copy one to write your own.
"""

from __future__ import annotations

from alignment.builtin import task


def gold(prompts, responses, rows) -> list[float]:
    """The built-in task's verifier (alignment.builtin.task.score); every row needs its `gold` spec."""
    missing = next((i for i, row in enumerate(rows) if not row.get("gold")), None)
    if missing is not None:
        raise ValueError(f"the gold reward needs a 'gold' spec on every prompt row (builtin:prompts_*); "
                         f"prompt {missing} has none")
    return [task.score(row["gold"], response) for row, response in zip(rows, responses)]


def digits(prompts, responses, rows) -> list[float]:
    """Share of a response's characters that are digits: a dense toy reward even a random model can climb."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def brevity(prompts, responses, rows, words: int = 8) -> list[float]:
    """1 for an answer of at most `words` words, falling towards 0 as it rambles."""
    return [min(1.0, words / max(len(r.split()), 1)) for r in responses]
