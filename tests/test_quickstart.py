"""alignment/quickstart.py's step 3: the RL stage's paired gain on the held-out constraint prompts, read from a real
`align eval` of a policy against a reference (the tiny model against a perturbed copy and against itself)."""

from __future__ import annotations

import json

import pytest

from alignment.quickstart import CONSTRAINT_PROMPTS, rl_constraints
from helpers import align_cache, perturbed_tiny_model, run_cli  # noqa: F401


def _eval(tmp_path, policy, reference):
    out = tmp_path / "eval"
    run_cli(["eval", "--policy", str(policy), "--reference", str(reference), "--prompts", CONSTRAINT_PROMPTS,
             "--num-prompts", "8", "--max-new-tokens", "6", "--out", str(out)]).check()
    return out / "eval.json"


def test_rl_constraints_is_the_paired_gain_of_the_eval(tmp_path, align_cache):
    moved = perturbed_tiny_model(tmp_path / "moved", seed=1)

    same = rl_constraints(_eval(tmp_path / "same", "tiny-llama", "tiny-llama"), "dpo")
    assert same["n"] == 8 and same["gain"] == 0.0 and same["before"] == same["after"]

    eval_json = _eval(tmp_path / "moved", moved, "tiny-llama")
    result, summary = json.loads(eval_json.read_text()), rl_constraints(eval_json, "dpo")
    scores = result["per_prompt"]["gold"]
    assert summary["after"] == pytest.approx(sum(scores) / len(scores))
    assert summary["before"] == pytest.approx(summary["after"] - summary["gain"])
    assert summary["gain_se"] == result["gold/gain_over_reference_se"] and summary["before_stage"] == "dpo"
    assert summary["prompts"] == CONSTRAINT_PROMPTS
