"""What `align rm` exports scores right for everyone: loaded the plain way (transformers alone, the chat
template over the whole conversation, the reward at the last token, as RewardBench and TRL score), with
`align score`, and with training's own forward, the rewards agree (fp32, 1e-4); full and LoRA reward
models alike, with the stored statistics for normalisation."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import align_cache, run_cli  # noqa: F401
from alignment.core.config import DataConfig
from alignment.data.report import DataReport
from alignment.data.sources import read_rows
from alignment.data.layout import collate_pairs
from alignment.data.preference import load_pairs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY_RM = ["rm", "configs/tiny/rm.yaml", "--set", "train.max_steps=4", "--set", "logging.progress_bar=false",
           "--set", "train.eval_interval=0", "--set", "train.save_interval=0", "--set", "data.max_eval_rows=32"]


def plain_rewards(model_dir, rows) -> list[tuple[float, float]]:
    """Rewards as a user computes them with transformers only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            pair = []
            for side in ("chosen", "rejected"):
                conversation = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
                pair.append(model(**tokenizer(conversation, return_tensors="pt")).logits[0, 0].item())
            out.append(tuple(pair))
    return out


def score_cli(model_dir, data, out, *extra) -> list[dict]:
    run_cli(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), *extra]).check()
    return [json.loads(line) for line in out.read_text().splitlines()]


def training_forward_rewards(model_dir, data) -> list[tuple[float, float]]:
    """The RM stage's own forward (shared-prompt packed rows, as the tiny recipe trains) on the export."""
    from alignment.core.models import load_model, load_tokenizer
    from reward.model import batch_rewards

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), "reward").eval()
    pairs = load_pairs(read_rows(str(data)), tokenizer, DataConfig(train=str(data), max_length=128), None,
                       DataReport("t"), reward_model=True)
    with torch.no_grad():
        rewards = batch_rewards(model, collate_pairs(pairs, tokenizer.pad_token_id, 128, share_prompt=True))
    half = len(pairs)
    return [(rewards[i].item(), rewards[half + i].item()) for i in range(half)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, align_cache):
    """Held-out built-in pairs short enough that no side is cut at the recipe's max_length (128)."""
    from alignment.core.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("tiny-llama"))

    def fits(row):
        return all(len(tok(tok.apply_chat_template(row["prompt"] + row[s], tokenize=False)).input_ids) <= 100
                   for s in ("chosen", "rejected"))

    rows = [r.data for r in read_rows("builtin:prefs_eval") if fits(r.data)][:6]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    return path, rows


def test_full_rm_scores_the_same_plain_with_align_score_and_in_training(tmp_path, pairs_file):
    data, rows = pairs_file
    run_cli(TINY_RM + ["--set", f"output_dir={tmp_path / 'rm'}", "--set", "train.precision=fp32"]).check()
    final = tmp_path / "rm" / "final"
    plain = plain_rewards(final, rows)
    scored = score_cli(final, data, tmp_path / "scores.jsonl")
    ours = training_forward_rewards(final, data)
    assert max(abs(a - b) for p in plain for a, b in zip(p, p[::-1])) > 1e-3, "responses score differently"
    for p, s, o in zip(plain, scored, ours):
        assert s["reward_chosen"] == pytest.approx(p[0], abs=1e-4) and s["reward_rejected"] == pytest.approx(p[1], abs=1e-4)
        assert o[0] == pytest.approx(p[0], abs=1e-4) and o[1] == pytest.approx(p[1], abs=1e-4)



def test_lora_rm_final_and_merged_score_with_normalisation_and_match(tmp_path, pairs_file):
    """A LoRA reward model trains, exports an adapter that reloads with its one-label head, and a merged/
    that keeps the distinct pad token and the reward statistics; both score as the live model did."""
    from reward.scorer import RewardScorer

    data, rows = pairs_file
    out = tmp_path / "rm-lora"
    result = run_cli(TINY_RM + ["--set", f"output_dir={out}", "--set", "train.precision=fp32",
                                "--set", "lora.enabled=true", "--set", "lora.r=8"]).check()
    assert "exported and verified" in result.output
    final, merged = out / "final", out / "final" / "merged"
    assert (final / "adapter_config.json").is_file() and (merged / "config.json").is_file()
    config = json.loads((merged / "config.json").read_text())
    tok = json.loads((merged / "tokenizer_config.json").read_text())
    assert config["pad_token_id"] is not None and config["pad_token_id"] != config["eos_token_id"], config
    assert len(config["id2label"]) == 1 and "reward_mean" in config and "reward_std" in config
    assert tok.get("pad_token") not in (None, tok.get("eos_token"))

    plain = plain_rewards(merged, rows)  # transformers alone, on the merged weights
    for model_dir in (final, merged):
        raw = RewardScorer(model_dir)
        normed = RewardScorer(model_dir, normalize=True)  # raised for a LoRA final/ before
        assert (normed.mean, normed.std) == (config["reward_mean"], config["reward_std"])
        scored = score_cli(model_dir, data, tmp_path / f"{model_dir.name}.jsonl")
        scored_norm = score_cli(model_dir, data, tmp_path / f"{model_dir.name}-n.jsonl", "--normalize")
        for p, s, n in zip(plain, scored, scored_norm):
            assert s["reward_chosen"] == pytest.approx(p[0], abs=1e-4), model_dir
            assert s["reward_rejected"] == pytest.approx(p[1], abs=1e-4), model_dir
            assert n["reward_chosen"] == pytest.approx((p[0] - raw.mean) / raw.std, abs=1e-4)
