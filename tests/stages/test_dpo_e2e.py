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


@pytest.mark.parametrize("reference", ["model", "adapter"])
def test_share_prefix_trains_like_padded_rows(tmp_path, reference):
    """Pairs whose prompts carry a system prompt: with dpo.share_prefix each micro-batch runs as one row (the
    system prompt once, each prompt once per pair); losses, accuracies and gradient norms equal padded rows,
    for a frozen reference model and for the adapter-off reference of LoRA."""
    import json

    from alignment.data.sources import read_rows

    from helpers import step_metrics

    system = {"role": "system", "content": "You are a concise assistant. Give only the answer, nothing else."}
    data = tmp_path / "sys.jsonl"
    with data.open("w") as handle:
        for r in read_rows("builtin:prefs_train")[:32]:
            row = dict(r.data)
            row["prompt"] = [system] + row["prompt"]
            handle.write(json.dumps(row) + "\n")
    runs = {}
    for share in (True, False):
        out = tmp_path / f"share-{share}"
        args = ["dpo", "configs/tiny/dpo.yaml", "--set", f"output_dir={out}", "--set", f"data.train={data}",
                "--set", "data.eval=null", "--set", "train.max_steps=4", "--set", "train.eval_interval=0",
                "--set", "train.save_interval=0", "--set", "train.precision=fp32", "--set", "logging.progress_bar=false",
                "--set", f"dpo.reference={reference}", "--set", f"dpo.share_prefix={str(share).lower()}",
                "--set", "train.adam_eps=1.0e-5"]
        if reference == "adapter":
            args += ["--set", "lora.enabled=true"]
        run_cli(args).check()
        runs[share] = step_metrics(out)
    a, b = runs[True], runs[False]
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s]["train/tokens_computed"] < 0.7 * b[s]["train/tokens_computed"]
        for key in ("loss", "rewards/margins", "logps/chosen", "train/grad_norm"):
            assert a[s][key] == pytest.approx(b[s][key], rel=1e-4, abs=1e-6), (s, key)
    assert a[4]["loss"] != pytest.approx(a[1]["loss"], rel=1e-3)  # it trained, so equal curves mean equal updates
