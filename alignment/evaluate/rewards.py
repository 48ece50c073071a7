"""Reward functions for `ppo.rewards` (source `module:function`), called as function(prompts, responses, rows)
-> one float per response: `prompts` as the prompt rows give them, `responses` the decoded texts, `rows` the
prompt rows themselves (any extra field, e.g. `gold`, is there). Copy one to write your own.
"""

from __future__ import annotations

from alignment.builtin import constraints as constraint_rules
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


def constraints(prompts, responses, rows) -> list[float]:
    """The share of a prompt's verifiable instruction constraints each response meets (alignment.builtin.
    constraints), for your own prompts: each row carries `constraints`, a list like
    [{"type": "caps"}, {"type": "words", "value": 5}] (the built-in prompts carry it in their `gold` spec)."""
    out = []
    for i, (row, response) in enumerate(zip(rows, responses)):
        specs = row.get("constraints") or (row.get("gold") or {}).get("constraints")
        if not specs:
            raise ValueError(f"prompt {i} has no 'constraints' list (e.g. [{{\"type\": \"caps\"}}])")
        out.append(constraint_rules.score(specs, task.cut_at_end(response)))
    return out
