"""wandb offline (the default without an API key): the run directory's history holds what metrics.jsonl holds."""

from __future__ import annotations

import math

import pytest

from helpers import align_cache, read_metrics, run_sft  # noqa: F401
from wandb_history import history


@pytest.mark.slow
def test_offline_wandb_history_equals_metrics_jsonl(tmp_path, align_cache, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "sft"
    run_sft(out, "logging.wandb=auto", "train.eval_interval=2", steps=4,
            env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""}).check()
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").glob("*"))
    logged = history(runs[0])
    expected: dict[int, dict] = {}
    for record in read_metrics(out):
        expected.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k != "step"})
    assert sorted(logged) == sorted(expected) and len(expected) >= 4
    for step, metrics in expected.items():
        assert set(logged[step]) == set(metrics), step
        for key, value in metrics.items():
            assert math.isclose(logged[step][key], value, rel_tol=1e-12, abs_tol=0), (step, key)
