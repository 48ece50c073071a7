"""`align pipeline` end to end on the tiny model: SFT -> RM -> on-policy pairs judged by that RM -> DPO from
the SFT model on those pairs, each stage in its own process; every stage's recipe checked before the first
trains; interrupted, resumed, and rerun only where its inputs changed."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from browser import check_report_in_browser
from helpers import align_cache, read_metrics, run_cli, step_metrics  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUICK = '["train.max_steps=2", "train.precision=fp32", "logging.progress_bar=false", "train.save_interval=0"{extra}]'
GOLD = (', "{stage}.gold_eval.prompts=builtin:prompts_eval", "{stage}.gold_eval.num_prompts=6", '
        '"{stage}.gold_eval.max_new_tokens=4"')
DPO = ('["train.max_steps=4", "train.precision=fp32", "logging.progress_bar=false", "train.save_interval=1", '
       '"dpo.reference=precomputed"' + GOLD.format(stage="dpo") + '{extra}]')
PPO = ('["train.max_steps=2", "train.save_interval=0", "logging.progress_bar=false", "ppo.max_new_tokens=4"'
       + GOLD.format(stage="ppo") + ']')


def pipeline(out, *extra: str, resume: bool = False, env=None, dpo_extra: str = ""):
    args = ["pipeline", "configs/tiny/pipeline.yaml", "--set", f"output_dir={out}",
            "--set", "sft.overrides=" + QUICK.format(extra=GOLD.format(stage="sft")),
            "--set", "rm.overrides=" + QUICK.format(extra=""), "--set", "dpo.overrides=" + DPO.format(extra=dpo_extra),
            "--set", "ppo.enabled=true", "--set", f"ppo.overrides={PPO}",
            "--set", "pairs.enabled=true", "--set", "pairs.judge=rm", "--set", "pairs.num_prompts=12",
            "--set", "pairs.samples=2", "--set", "pairs.max_new_tokens=6"]
    for item in extra:
        args += ["--set", item]
    return run_cli(args + (["--resume"] if resume else []), env=env, timeout=580)


def test_a_bad_later_stage_fails_before_the_first_trains(tmp_path):
    out = tmp_path / "pipe"
    result = pipeline(out, dpo_extra=', "dpo.reference=adapter"')  # an adapter reference needs LoRA
    assert result.returncode == 2, result.output[-3000:]
    assert "dpo.reference: adapter needs lora.enabled" in result.output
    assert not (out / "sft").exists(), "nothing trained"


def test_tiny_pipeline_interrupted_resumed_and_rerun_where_inputs_changed(tmp_path):
    out = tmp_path / "pipe"
    # 1. DPO dies at step 3 (SFT and RM stop at 2, so only DPO gets there), after checkpointing step 2.
    crashed = pipeline(out, env={"ALIGN_DEBUG_FAIL_AT_STEP": "3"})
    assert crashed.returncode != 0 and "injected failure at step 3" in crashed.output, crashed.output[-3000:]
    for stage in ("sft", "rm", "pairs"):
        assert json.loads((out / stage / "manifest.json").read_text())["complete"], stage
    assert json.loads((out / "dpo" / "manifest.json").read_text())["complete"] is False  # started, not finished
    assert not (out / "dpo" / "final").exists()
    finished = {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in ("sft", "rm")}

    # 2. --resume: the finished stages are skipped, DPO continues from its checkpoint.
    resumed = pipeline(out, resume=True).check()
    for stage in ("sft", "rm", "pairs"):
        assert f"stage {stage}: finished with the same inputs, skipped" in resumed.output
    assert "resuming from" in resumed.output and "step-00000002" in resumed.output
    assert {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in ("sft", "rm")} == finished
    assert sorted(step_metrics(out / "dpo")) == [1, 2, 3, 4]

    summary = json.loads((out / "pipeline.json").read_text())
    assert list(summary["stages"]) == ["sft", "rm", "pairs", "dpo", "ppo"], resumed.output[-3000:]
    for stage, steps in (("sft", 2), ("rm", 2), ("dpo", 4), ("ppo", 2)):
        assert (out / stage / "final" / "config.json").is_file()
        losses = [m["loss"] for m in read_metrics(out / stage) if "loss" in m]
        assert len(losses) == steps and all(math.isfinite(x) for x in losses), (stage, losses)
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["complete"] and manifest["stage"] == stage
    # Each stage's held-out numbers reach the summary as its own metrics logged them, and summary.json has
    # the gold score after each stage (base: before SFT) and the RM's accuracy.
    assert summary["stages"]["rm"]["eval/accuracy"] == read_metrics(out / "rm")[-1]["eval/accuracy"]
    scores = json.loads((out / "summary.json").read_text())
    logged = {s: {k: v for m in read_metrics(out / s) for k, v in m.items()} for s in ("sft", "dpo", "ppo")}
    assert scores["gold"] == {"base": logged["sft"]["gold/score_before"], "sft": logged["sft"]["gold/score"],
                              "dpo": logged["dpo"]["gold/score"], "ppo": logged["ppo"]["gold/score"]}
    assert scores["rm_accuracy"] == summary["stages"]["rm"]["eval/accuracy"]
    # ... and the score by task family, greedy, as each stage logged it (gold/<family>).
    assert set(scores) == {"gold", "rm_accuracy", "families"}
    for stage in ("sft", "dpo", "ppo"):
        greedy = scores["families"][stage]["greedy"]
        assert greedy["all"] == logged[stage]["gold/score"]
        assert {f: logged[stage][f"gold/{f}"] for f in greedy if f != "all"} == {f: v for f, v in greedy.items()
                                                                                 if f != "all"}
    assert scores["families"]["base"]["greedy"]["all"] == logged["sft"]["gold/score_before"]
    check_report_in_browser(out / "report.html", scores, tmp_path / "report.png")
    assert 0.0 <= summary["stages"]["dpo"]["eval/rewards/accuracies"] <= 1.0
    # DPO starts from the SFT export: with the reference precomputed from that same model, the policy and
    # the reference agree exactly before the first update (a DPO that started elsewhere would not).
    assert step_metrics(out / "dpo")[1]["check/step1_reward_abs"] < 1e-5
    from alignment.core.fingerprint import model_fingerprint

    dpo_inputs = json.loads((out / "dpo" / "manifest.json").read_text())["inputs"]["files"]
    assert dpo_inputs["model.name_or_path"] == model_fingerprint(str(out / "sft" / "final")), "lineage: SFT's export"

    # The pairs come from the SFT policy, ranked by the pipeline's reward model ...
    pairs_file = out / "pairs" / "pairs.jsonl"
    records = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert len(records) == summary["stages"]["pairs"]["pairs"] > 0
    assert all(r["score_chosen"] > r["score_rejected"] for r in records)
    # ... the very scores that reward model gives them (the judge was the pipeline's RM, not another) ...
    from reward.scorer import RewardScorer
    from reward.scorer import sequence_ids

    scorer = RewardScorer(out / "rm" / "final")
    for record in records[:4]:
        ids = sequence_ids(scorer.tokenizer, record["prompt"], record["chosen"], scorer.max_length,
                           ended=not record["chosen_truncated"])
        assert scorer.score_ids([ids]).item() == pytest.approx(record["score_chosen"], abs=1e-4)
    # ... and DPO trained on them, starting from the SFT export.
    dpo_recipe = yaml.safe_load((out / "dpo" / "recipe.yaml").read_text())
    assert dpo_recipe["data"]["train"] == str(pairs_file)
    assert dpo_recipe["model"]["name_or_path"].startswith(str(out / "sft" / "final"))

    # FAILURES row 16: every stage saved the tokenizer SFT trained with: byte-identical chat templates, the same
    # ids for one rendered conversation, the same stop tokens for generation as for training's responses.
    from alignment.data import text
    from alignment.core.models import load_tokenizer

    conversation = [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "12"}]
    saved = {stage: load_tokenizer(str(out / stage / "final")) for stage in ("sft", "rm", "dpo", "ppo")}
    for stage, tok in saved.items():
        assert tok.chat_template == saved["sft"].chat_template, stage
        assert tok.apply_chat_template(conversation) == saved["sft"].apply_chat_template(conversation), stage
        assert text.stop_token_ids(tok) == text.stop_token_ids(saved["sft"]), stage
        assert text.encode(tok, conversation[:1], "12").response_ids[-1] in text.stop_token_ids(tok), stage

    # 3. Nothing changed: nothing runs. 4. Only DPO's inputs changed: only DPO runs, from scratch.
    again = pipeline(out, resume=True).check()
    assert again.output.count("finished with the same inputs, skipped") == 5
    changed = pipeline(out, resume=True, dpo_extra=', "dpo.beta=0.2"').check()
    # DPO changed, so PPO (which starts from DPO's export) runs again too.
    assert changed.output.count("finished with the same inputs, skipped") == 3
    assert "stage dpo: inputs changed since it finished (recipe); running it again" in changed.output
    assert "resuming from" not in changed.output
    assert yaml.safe_load((out / "dpo" / "recipe.yaml").read_text())["dpo"]["beta"] == 0.2


def test_stages_with_different_tokenizers_fail_before_training(tmp_path, align_cache):
    """An RM whose chat template differs from the policy's would score another rendering: refused up front."""
    import shutil

    from alignment.core.models import resolve_model_path

    other = tmp_path / "other-template"
    shutil.copytree(resolve_model_path("tiny-llama"), other)
    template = other / "chat_template.jinja"
    config = json.loads((other / "tokenizer_config.json").read_text())
    if template.exists():
        template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    else:
        config["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
        (other / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "pipe"
    result = run_cli(["pipeline", "configs/tiny/pipeline.yaml", "--set", f"output_dir={out}",
                      "--set", f"rm.overrides=[model.name_or_path={other}]"])
    assert result.returncode == 2, result.output[-2000:]
    assert "pipeline stages sft and rm use different tokenizers (different chat template)" in result.output
    assert not (out / "sft").exists()
