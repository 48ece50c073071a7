"""`align estimate`: the parts against the real objects (parameter counts, LoRA adapters, ZeRO sharding), and
the whole estimate against the peak memory the tiny stages report (within 25%)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, align_cache, child_env, read_metrics, run_cli  # noqa: F401


def _recipe(stage: str, *sets: str):
    from alignment.cli import stage_module
    from alignment.core.recipes import load_recipe

    stage_module(stage)
    return load_recipe(str(REPO / "configs" / "tiny" / f"{stage}.yaml"), stage, list(sets))


def test_parameter_and_adapter_counts_match_the_models(align_cache):
    import peft
    from transformers import AutoModelForCausalLM

    from alignment.cluster.estimate import Shape, lora_params
    from alignment.core.models import resolve_model_path

    path = resolve_model_path("tiny-llama")
    shape = Shape.of(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.params == sum(p.numel() for p in model.parameters())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    adapters = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert lora_params(shape, 8, ["all-linear"]) == adapters


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stages_shard_what_they_say(zero, align_cache):
    from alignment.cluster.estimate import estimate

    terms = {}
    for world in (1, 2):
        est = estimate(_recipe("sft", f"deepspeed.zero_stage={zero}", "train.precision=bf16"), "sft", world,
                       probe=False)
        terms[world] = {t.what: t.bytes for t in est.terms if t.role == "policy"}
    one, two = terms[1], terms[2]
    assert two["optimizer (Adam m, v)"] == pytest.approx(one["optimizer (Adam m, v)"] / (2 if zero >= 1 else 1))
    assert two["fp32 master weights"] == pytest.approx(one["fp32 master weights"] / (2 if zero >= 1 else 1))
    assert two["gradients"] == pytest.approx(one["gradients"] / (2 if zero >= 2 else 1))
    if zero == 3:
        assert two["weights"] < one["weights"]
    else:
        assert two["weights"] == one["weights"]
    assert ("fp32 gradients" in one) == (zero == 0)  # DeepSpeed's BF16_Optimizer keeps them at ZeRO-0 only
    assert two["activations"] == one["activations"]  # per rank: the micro-batch does not shrink with ranks


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_tiny_estimate_is_within_25_percent_of_the_measured_peak(stage, tmp_path, align_cache):
    out = tmp_path / stage
    run_cli([stage, f"configs/tiny/{stage}.yaml", "--set", f"output_dir={out}", "--set",
             "logging.progress_bar=false"]).check()
    measured = max(r["memory/peak_rss_mib"] for r in read_metrics(out) if "memory/peak_rss_mib" in r)
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", "estimate", f"configs/tiny/{stage}.yaml",
                           "--json", str(tmp_path / "estimate.json")], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "formula" in proc.stdout and "activations" in proc.stdout
    estimated = json.loads((tmp_path / "estimate.json").read_text())["total_mib"]
    print(f"{stage}: estimated {estimated:.0f} MiB, measured peak RSS {measured:.0f} MiB "
          f"({estimated / measured - 1:+.1%})")
    assert abs(estimated / measured - 1) <= 0.25


def test_unknown_stage_names_are_refused(tmp_path):
    recipe = tmp_path / "mystery.yaml"
    recipe.write_text("output_dir: x\n")
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", "estimate", str(recipe)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pass --stage" in proc.stderr
