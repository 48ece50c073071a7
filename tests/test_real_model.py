"""Real-model checks on CPU: SmolLM2-135M-Instruct on the built-in task and on real hh-rlhf pairs.

Each test runs the real CLI stage with a short recipe and asserts a learning outcome on
held-out data the run never trained on. They take a few minutes together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# DPO on hh-rlhf takes ~10 CPU minutes (LoRA backward through all 30 layers, 40 steps): it and the reward-model
# checks (and the SFT one) are kept out of `make test` and run with ALIGN_REAL_DATA_TESTS=1 (`make test-real`).
needs_opt_in = pytest.mark.skipif(
    not os.environ.get("ALIGN_REAL_DATA_TESTS"), reason="set ALIGN_REAL_DATA_TESTS=1 (long real-data runs)"
)


def run_stage(stage: str, recipe: str, out: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "alignment.cli", stage, recipe, "--set", f"output_dir={out}",
           "--set", "logging.progress_bar=false", *[x for o in overrides for x in ("--set", o)]]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_at(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in metrics if key in m]


@needs_opt_in  # 66 s: cut from make test for bf16-mixed's end-to-end test; the quickstart's SFT stage (SmolLM2,
# held-out loss and gold score before and after) covers the same path
def test_sft_smollm2_lora_lowers_heldout_loss(tmp_path):
    metrics = run_stage(
        "sft", "configs/smollm2/sft.yaml", tmp_path / "sft",
        "train.max_steps=24", "train.global_batch_size=8", "train.micro_batch_size=8", "data.max_rows=192",
        "data.max_eval_rows=32", "data.max_length=96", "train.eval_interval=0", "train.save_interval=0",
        "sft.gold_eval.prompts=null", "lora.merge_on_export=false",
    )
    curve = eval_at(metrics, "eval/loss")
    assert curve[0][0] == 0 and curve[-1][0] == 24, curve
    before, after = curve[0][1], curve[-1][1]
    assert after < before - 0.3, f"held-out loss {before:.3f} -> {after:.3f}"


# On a CPU without fast bf16 (AVX2 only: train.precision auto -> fp32) this test took 667 s alone and more
# than 900 s (1,216 s once) beside the suite's other worker (2026-12-03), hence its own limit.
@pytest.mark.timeout(2700)
@needs_opt_in  # 7 of the suite's 20 minutes on 2 cores; the file's quirks are checked at the data level in make test
def test_reward_model_on_hh_rlhf_beats_chance(tmp_path, hh_path):
    metrics = run_stage(
        "rm", "configs/smollm2/rm-hh.yaml", tmp_path / "rm", f"data.train={hh_path}",
        "train.max_steps=40", "train.eval_interval=0", "data.max_eval_rows=240",
        # the quick settings this check was measured with (the recipe itself trains a whole epoch in full)
        "data.eval_fraction=0.15", "data.max_length=192", "train.learning_rate=2e-4", "train.warmup_steps=5",
        # one held-out pass, at the end: the one asserted on (an eval before training cost a fifth of the test)
        "train.eval_before_training=false", "rm.max_prompt_length=96", "rm.trainable_layers=6", "rm.center_coef=0.01",
    )
    accuracy = eval_at(metrics, "eval/accuracy")[-1][1]
    pairs = eval_at(metrics, "eval/pairs")[-1][1]
    assert pairs == 240
    # 240 unseen pairs: chance is 0.5 with a standard error of 0.032; "the shorter response
    # wins" scores 0.56 on this file. Measured (2-core CPU, bf16): 0.625 with right-padded rows and SDPA
    # (2026-11-24); 0.617 with the recipe's shared-prompt packing and eager attention (2026-11-25);
    # fp32 (precision auto on an AVX2-only CPU), packed, SDPA: 0.650 (2026-12-03).
    assert accuracy >= 0.58, f"held-out hh-rlhf accuracy {accuracy:.3f}"
    config = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert len(config["id2label"]) == 1  # a standard num_labels=1 sequence classifier
    assert "reward_mean" in config and "reward_std" in config


@needs_opt_in  # 160 s: cut from make test when the docs' own-model walk-through (76 s) came in; the quickstart's
# reward model (SmolLM2, the same recipe, 0.773 held-out accuracy in summary.json) covers the same path
def test_reward_model_ranks_builtin_gold_pairs(tmp_path):
    metrics = run_stage("rm", "configs/smollm2/rm.yaml", tmp_path / "rm", "train.max_steps=40",
                        "train.eval_interval=0", "data.max_eval_rows=128")
    accuracy = eval_at(metrics, "eval/accuracy")[-1][1]
    # 128 unseen pairs (most rejected answers are near-miss numbers): measured 0.789 right-padded with
    # SDPA, 0.766 with shared-prompt packing and eager attention (bf16 rounding differs; fp32 is equal).
    assert accuracy >= 0.70, f"built-in task held-out accuracy {accuracy:.3f}"


@needs_opt_in
def test_dpo_on_hh_rlhf_implicit_reward_beats_chance(tmp_path, hh_path):
    metrics = run_stage(
        "dpo", "configs/smollm2/dpo-hh.yaml", tmp_path / "dpo", f"data.train={hh_path}",
        "train.max_steps=40", "train.eval_interval=0", "data.max_eval_rows=200", "lora.merge_on_export=false",
        # the quick settings this check was measured with (the recipe itself trains a whole epoch in full)
        "data.eval_fraction=0.15", "data.max_length=192", "train.learning_rate=2e-4", "train.warmup_steps=4",
        "train.eval_before_training=true", "lora.enabled=true", "lora.r=16", "lora.alpha=32", "dpo.reference=auto",
        "dpo.max_prompt_length=96", "dpo.beta=0.1",
    )
    start = eval_at(metrics, "eval/rewards/accuracies")[0]
    end = eval_at(metrics, "eval/rewards/accuracies")[-1]
    assert start[0] == 0 and abs(eval_at(metrics, "eval/rewards/margins")[0][1]) < 0.05
    # 200 unseen pairs (standard error 0.035 around chance): measured 0.59.
    assert end[1] >= 0.55, f"held-out implicit-reward accuracy {end[1]:.3f}"
