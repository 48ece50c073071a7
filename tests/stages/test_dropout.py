"""Dropout is off in preference training by default (TRL's disable_dropout), with a recipe key to keep it:
with it on, DPO's adapter-off reference pass is itself noisy and the step-1 ln 2 check fails; a reward
model's training forward is not the function it is evaluated and exported as."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import align_cache, run_cli, step_metrics  # noqa: F401
from alignment.core.models import resolve_model_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUIET = ("train.precision=fp32", "logging.progress_bar=false", "train.max_steps=1", "train.save_interval=0",
         "train.eval_interval=0", "lora.merge_on_export=false")


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory, align_cache):
    """tiny-llama with attention dropout 0.3 (as many real checkpoints ship)."""
    out = tmp_path_factory.mktemp("dropout") / "tiny-dropout"
    shutil.copytree(resolve_model_path("tiny-llama"), out, ignore=shutil.ignore_patterns(".complete"))
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (out / "config.json").write_text(json.dumps(config))
    return out


def _run(stage: str, recipe: str, out, model, *extra: str) -> dict:
    args = [stage, recipe, "--set", f"output_dir={out}", "--set", f"model.name_or_path={model}"]
    for item in QUIET + extra:
        args += ["--set", item]
    run_cli(args).check()
    return step_metrics(out)[1]


@pytest.mark.parametrize("keep", [False, True])
def test_dpo_adapter_reference_is_exact_at_step_1(tmp_path, dropout_model, keep):
    step1 = _run("dpo", "configs/tiny/dpo.yaml", tmp_path / "dpo", dropout_model, "lora.enabled=true",
                 "lora.dropout=0.3", "dpo.reference=adapter", "data.eval=null", f"dpo.disable_dropout={str(not keep).lower()}")
    if keep:  # the key still lets a user train with dropout, and then the check sees the noise
        assert step1["check/step1_reward_abs"] > 1e-3
    else:
        assert step1["check/step1_reward_abs"] < 1e-6
        assert step1["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


@pytest.mark.parametrize("keep", [False, True])
def test_rm_trains_the_function_it_evaluates(tmp_path, dropout_model, keep):
    """The same 8 pairs evaluated at step 0 (eval mode) and trained on at step 1: equal margins without dropout."""
    metrics = [_run("rm", "configs/tiny/rm.yaml", tmp_path / "rm", dropout_model, "data.max_rows=8",
                    "data.eval=builtin:prefs_train", "data.max_eval_rows=8", "train.global_batch_size=8",
                    f"rm.disable_dropout={str(not keep).lower()}")]
    eval0 = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()][0]
    assert eval0["step"] == 0 and eval0["eval/pairs"] == 8
    same = metrics[0]["rewards/margins"] == pytest.approx(eval0["eval/margin"], rel=1e-5, abs=1e-6)
    assert same != keep, (metrics[0]["rewards/margins"], eval0["eval/margin"])
