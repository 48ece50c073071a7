"""`align eval` (alignment/evaluate/evaluation.py): the pure parts by hand, then the tiny model against
itself (KL exactly 0, every comparison a tie, no forgetting) and against a perturbed copy, and a reward
model's per-category accuracy against scores computed directly."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from alignment.core.models import load_model, load_tokenizer, resolve_model_path
from alignment.evaluate.evaluation import continuation_logprobs, mean_and_se, win_rate
from helpers import align_cache, perturbed_tiny_model, run_cli  # noqa: F401
from reward.model import ensure_distinct_pad
from reward.scorer import RewardScorer
from reward.scorer import sequence_ids


def test_win_rate_and_standard_error_by_hand():
    assert win_rate([1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 1.0, 0.25]) == (
        {"win_rate": (2 + 0.5) / 4, "wins": 0.5, "ties": 0.25, "losses": 0.25})
    mean, se = mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx((14 / 3 / 4) ** 0.5)  # sample variance 14/3
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_continuation_logprobs_are_batch_invariant_and_match_a_full_forward(align_cache):
    path = resolve_model_path("tiny-llama")
    model = load_model(path, "causal_lm").float().eval()
    prefixes, conts = [[1, 5, 9], [1, 7]], [[11, 12], [13, 14, 15, 16]]
    together = continuation_logprobs(model, prefixes, conts, pad_id=0)
    alone = [continuation_logprobs(model, [p], [c], pad_id=0)[0] for p, c in zip(prefixes, conts)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    ids = torch.tensor([prefixes[1] + conts[1]])
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    by_hand = torch.stack([full[len(prefixes[1]) - 1 + t, c] for t, c in enumerate(conts[1])])
    torch.testing.assert_close(together[1], by_hand, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, align_cache):
    return perturbed_tiny_model(tmp_path_factory.mktemp("perturbed") / "policy", seed=0)


def _eval(tmp_path, *args):
    out = tmp_path / "eval"
    result = run_cli(["eval", "--out", str(out), "--num-prompts", "6", "--max-new-tokens", "5", *args]).check()
    # each phase of a policy evaluation is announced, so a long one is never silent
    if "--policy" in args:
        assert "greedy responses of the policy to 6 prompts" in result.output and "forgetting check" in result.output
    return json.loads((out / "eval.json").read_text()), out


def test_policy_against_itself_and_against_a_perturbed_copy(tmp_path, perturbed, align_cache):
    same, out = _eval(tmp_path / "same", "--policy", "tiny-llama", "--reference", "tiny-llama")
    assert same["objective/kl"] == 0.0 and same["forgetting/nll_change"] == 0.0
    assert same["win/gold/ties"] == 1.0 and same["win/gold/win_rate"] == 0.5
    assert same["num_prompts"] == same["gold/n"] == 6 and 0 <= same["response/eos_share"] <= 1
    assert 0 < same["response/length"] <= 5 and len(same["samples"]) == 6
    page = (out / "report.html").read_text()
    assert 'data-key="objective/kl"' in page and 'id="samples"' in page

    moved, _ = _eval(tmp_path / "moved", "--policy", str(perturbed), "--reference", "tiny-llama")
    assert moved["objective/kl"] != 0.0 and moved["forgetting/nll_change"] != 0.0
    from alignment.builtin import task

    # the gold score is the verifier's over the very responses shown
    golds = {r["id"]: r["gold"] for r in map(json.loads, open(task_prompts()).read().splitlines())}
    for s in moved["samples"]:
        assert s["gold_policy"] == task.score(golds[s["id"]], s["policy"])


def test_a_lora_run_final_folder_is_evaluated_through_its_merged_model(tmp_path, perturbed, align_cache):
    """`--policy runs/x/final` of a LoRA run (adapter files, the plain model in merged/) reads merged/, as the gold
    score does; the responses are the merged model's own."""
    import shutil

    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    shutil.copytree(perturbed, final / "merged")
    via_final, _ = _eval(tmp_path / "a", "--policy", str(final))
    direct, _ = _eval(tmp_path / "b", "--policy", str(perturbed))
    assert [s["policy"] for s in via_final["samples"]] == [s["policy"] for s in direct["samples"]]
    assert via_final["gold/score"] == direct["gold/score"]


def test_a_lora_adapter_folder_without_merged_is_evaluated_on_its_base(tmp_path, align_cache):
    """An adapter export without merged/ (lora.merge_on_export false) loads as its adapter on its base: with B = 0
    (LoRA's initialisation) the answers are the base model's."""
    from peft import LoraConfig, get_peft_model

    path = resolve_model_path("tiny-llama")
    adapter = get_peft_model(load_model(path, "causal_lm"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path / "final"
    adapter.save_pretrained(folder)
    load_tokenizer(path).save_pretrained(folder)
    assert not (folder / "merged").exists() and (folder / "adapter_config.json").is_file()
    via_adapter, _ = _eval(tmp_path / "a", "--policy", str(folder))
    base, _ = _eval(tmp_path / "b", "--policy", "tiny-llama")
    assert [s["policy"] for s in via_adapter["samples"]] == [s["policy"] for s in base["samples"]]


def test_own_prompts_with_constraints_are_scored_by_their_constraints(tmp_path, align_cache):
    """Rows that carry only `constraints` (the ppo reward's shape) get a gold score: the share met, per prompt."""
    from alignment.builtin import constraints, task

    rows = [{"id": f"c{i}", "prompt": f"Say something about tea {i}.", "constraints": specs}
            for i, specs in enumerate([[{"type": "caps"}], [{"type": "no_commas"}, {"type": "words", "value": 3}]] * 3)]
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, _ = _eval(tmp_path, "--policy", "tiny-llama", "--prompts", str(prompts))
    assert result["gold/n"] == 6 and "gold/constraints" in result
    for sample, row in zip(result["samples"], rows):
        assert sample["gold_policy"] == constraints.score(row["constraints"], task.cut_at_end(sample["policy"]))


def task_prompts():
    from alignment.data.sources import resolve_source

    return resolve_source("builtin:prompts_eval")


def test_reward_model_accuracy_per_category(tmp_path, align_cache):
    path = resolve_model_path("tiny-llama")
    tok = load_tokenizer(path)
    model = load_model(path, "reward").eval()
    ensure_distinct_pad(tok, model)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(1)))
    rm = tmp_path / "rm"
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    rows = [{"prompt": f"Question {i}?", "chosen": f"answer {i} " * (1 + i % 3), "rejected": f"no {i}",
             "category": "even" if i % 2 == 0 else "odd"} for i in range(10)]
    rows.append({"prompt": "Same?", "chosen": "same", "rejected": "same", "category": "odd"})  # unusable: counted
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, _ = _eval(tmp_path, "--reward-model", str(rm), "--pairs", str(pairs), "--num-prompts", "0")
    scorer = RewardScorer(rm)

    def score(prompt, response):
        return scorer.score_ids([sequence_ids(scorer.tokenizer, prompt, response, scorer.max_length)]).item()

    right = {"even": [], "odd": []}
    for r in rows[:10]:
        right[r["category"]].append(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]))
    for name, hits in right.items():
        assert result[f"rm/accuracy/{name}"] == pytest.approx(sum(hits) / len(hits))
        assert result[f"rm/pairs/{name}"] == 5
    assert result["rm/accuracy"] == pytest.approx(sum(sum(h) for h in right.values()) / 10)
    assert sum(result["dropped"].values()) == 1 and result["rm/pairs"] == 10.0
    assert 0 <= result["rm/ece"] <= 1 and -1 <= result["rm/length_corr"] <= 1
