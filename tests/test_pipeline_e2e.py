"""`align pipeline` end to end on the tiny model: SFT -> RM -> on-policy pairs judged by that
RM -> DPO from the SFT model on those pairs, each stage in its own process."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from helpers import align_cache, read_metrics, run_cli  # noqa: F401


@pytest.mark.timeout(600)
def test_tiny_pipeline_with_onpolicy_pairs(tmp_path, align_cache):
    out = tmp_path / "pipe"
    quick = '["train.max_steps=4", "train.precision=fp32", "logging.progress_bar=false"]'
    result = run_cli([
        "pipeline", "configs/tiny/pipeline.yaml", "--set", f"output_dir={out}",
        "--set", f"sft.overrides={quick}", "--set", f"rm.overrides={quick}",
        "--set", 'dpo.overrides=["train.max_steps=4", "train.precision=fp32", "logging.progress_bar=false", '
                 '"dpo.reference=precomputed"]',
        "--set", "pairs.enabled=true", "--set", "pairs.judge=rm", "--set", "pairs.num_prompts=12",
        "--set", "pairs.samples=2", "--set", "pairs.max_new_tokens=6",
    ], timeout=580).check()

    summary = json.loads((out / "pipeline.json").read_text())
    assert list(summary["stages"]) == ["sft", "rm", "pairs", "dpo"], result.output[-3000:]
    for stage in ("sft", "rm", "dpo"):
        assert (out / stage / "final" / "config.json").is_file()
        losses = [m["loss"] for m in read_metrics(out / stage) if "loss" in m]
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), (stage, losses)
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["complete"] and manifest["stage"] == stage
    # Each stage's held-out numbers reach the summary as its own metrics logged them.
    assert summary["stages"]["rm"]["eval/accuracy"] == read_metrics(out / "rm")[-1]["eval/accuracy"]
    assert 0.0 <= summary["stages"]["dpo"]["eval/rewards/accuracies"] <= 1.0
    # DPO starts from the SFT export: with the reference precomputed from that same model, the policy and
    # the reference agree exactly before the first update (a DPO that started elsewhere would not).
    dpo_steps = {m["step"]: m for m in read_metrics(out / "dpo") if "loss" in m}
    assert dpo_steps[1]["check/step1_reward_abs"] < 1e-5
    from alignment.core.fingerprint import model_fingerprint

    dpo_inputs = json.loads((out / "dpo" / "manifest.json").read_text())["inputs"]["files"]
    assert dpo_inputs["model.name_or_path"] == model_fingerprint(str(out / "sft" / "final")), "lineage: SFT's export"

    # The pairs come from the SFT policy, ranked by the pipeline's reward model ...
    pairs_file = out / "pairs" / "pairs.jsonl"
    records = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert len(records) == summary["stages"]["pairs"]["pairs"] > 0
    assert all(r["score_chosen"] > r["score_rejected"] for r in records)
    # ... the very scores that reward model gives them (the judge was the pipeline's RM, not another).
    from reward.model import RewardScorer
    from reward.score import sequence_ids

    scorer = RewardScorer(out / "rm" / "final")
    for record in records[:4]:
        ids = sequence_ids(scorer.tokenizer, record["prompt"], record["chosen"], scorer.max_length)
        assert scorer.score_ids([ids]).item() == pytest.approx(record["score_chosen"], abs=1e-4)
    # ... and DPO trained on them, starting from the SFT export.
    dpo_recipe = yaml.safe_load((out / "dpo" / "recipe.yaml").read_text())
    assert dpo_recipe["data"]["train"] == str(pairs_file)
    assert dpo_recipe["model"]["name_or_path"].startswith(str(out / "sft" / "final"))
