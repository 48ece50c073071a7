"""DPO end to end on the tiny model: what the logged evaluation means."""

from __future__ import annotations

import math

import pytest

from helpers import align_cache, read_metrics, run_cli  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_rpo_eval_loss_is_the_same_quantity_at_every_evaluation(tmp_path):
    """With rpo_alpha, eval/loss = mean preference loss + alpha x the chosen NLL per token over the eval set,
    whatever the last training batch held. At learning rate 0 the policy stays the reference, so every
    evaluation must give ln 2 + alpha x (-eval/logps/chosen_per_token), the same number each time."""
    out = tmp_path / "dpo"
    run_cli(["dpo", "configs/tiny/dpo.yaml", "--set", f"output_dir={out}", "--set", "train.learning_rate=0",
             "--set", "train.max_steps=4", "--set", "train.eval_interval=2", "--set", "train.save_interval=0",
             "--set", "dpo.rpo_alpha=0.5", "--set", "train.precision=fp32", "--set", "logging.progress_bar=false",
             "--set", "data.max_eval_rows=16"]).check()
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    for m in evals:
        expected = math.log(2) + 0.5 * -m["eval/logps/chosen_per_token"]
        assert m["eval/loss"] == pytest.approx(expected, rel=1e-6), m
    assert len({round(m["eval/loss"], 9) for m in evals}) == 1
