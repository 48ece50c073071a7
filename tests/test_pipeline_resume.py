"""`align pipeline`: every stage's full validation runs before the first stage trains; `--resume` skips
stages that finished with the same inputs (their manifest.json), reruns what changed, and continues an
interrupted stage from its checkpoint."""

from __future__ import annotations

import json

import pytest

from helpers import align_cache, run_cli, step_metrics  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = '["train.max_steps=2", "train.precision=fp32", "logging.progress_bar=false", "train.eval_interval=0", ' \
       '"train.save_interval=0", "data.max_eval_rows=16"]'
DPO = '["train.max_steps=4", "train.precision=fp32", "logging.progress_bar=false", "train.eval_interval=0", ' \
      '"train.save_interval=1", "data.max_eval_rows=16", "dpo.reference=precomputed"{extra}]'


def pipeline(out, *extra: str, resume: bool = False, env=None, dpo_extra: str = ""):
    args = ["pipeline", "configs/tiny/pipeline.yaml", "--set", f"output_dir={out}", "--set", f"sft.overrides={FAST}",
            "--set", f"rm.overrides={FAST}", "--set", "dpo.overrides=" + DPO.format(extra=dpo_extra)]
    for item in extra:
        args += ["--set", item]
    return run_cli(args + (["--resume"] if resume else []), env=env, timeout=580)


def test_a_bad_later_stage_fails_before_the_first_trains(tmp_path):
    out = tmp_path / "pipe"
    result = pipeline(out, dpo_extra=', "dpo.reference=adapter"')  # adapter reference needs LoRA
    assert result.returncode == 2, result.output[-3000:]
    assert "dpo.reference: adapter needs lora.enabled" in result.output
    assert not (out / "sft").exists(), "nothing trained"


def test_resume_skips_finished_stages_and_continues_an_interrupted_one(tmp_path):
    out = tmp_path / "pipe"
    crashed = pipeline(out, env={"ALIGN_DEBUG_FAIL_AT_STEP": "3"})  # SFT and RM stop at 2: only DPO reaches 3
    assert crashed.returncode != 0 and "injected failure at step 3" in crashed.output
    for stage in ("sft", "rm"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["complete"] and manifest["stage"] == stage
    assert json.loads((out / "dpo" / "manifest.json").read_text())["complete"] is False  # started, not finished
    assert not (out / "dpo" / "final").exists()
    finished = {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in ("sft", "rm")}

    resumed = pipeline(out, resume=True).check()
    assert "stage sft: finished with the same inputs, skipped" in resumed.output
    assert "stage rm: finished with the same inputs, skipped" in resumed.output
    assert "resuming from" in resumed.output and "step-00000002" in resumed.output
    assert {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in ("sft", "rm")} == finished
    assert sorted(step_metrics(out / "dpo")) == [1, 2, 3, 4]
    assert json.loads((out / "dpo" / "manifest.json").read_text())["complete"]

    again = pipeline(out, resume=True).check()  # nothing changed: nothing runs
    assert again.output.count("finished with the same inputs, skipped") == 3

    changed = pipeline(out, resume=True, dpo_extra=', "dpo.beta=0.2"').check()  # only DPO's inputs changed
    assert changed.output.count("finished with the same inputs, skipped") == 2
    assert "stage dpo: inputs changed since it finished (recipe); running it again" in changed.output
    assert json.loads((out / "dpo" / "recipe.yaml").read_text().split("beta: ", 1)[1].split("\n")[0]) == 0.2
