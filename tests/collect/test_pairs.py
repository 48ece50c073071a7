"""On-policy pairs (`align pairs`, alignment/onpolicy.py): pair selection by hand, and a
tiny end-to-end run whose output the preference loaders read back.

The tiny random Llama is the policy; a tiny reward model with a unit-std random head is
the judge (its scores never tie), and the built-in held-out prompts carry gold specs, so
the judge-vs-gold agreement is counted too.
"""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

from alignment.builtin import task
from alignment.core.config import DataConfig
from alignment.data.report import DataReport
from alignment.data.sources import DataError, Row, read_rows
from alignment.core.models import load_model, load_tokenizer, resolve_model_path
from alignment.collect.pairs import Sample, best_and_worst, make_pairs, sample_responses
from alignment.data.preference import PairRejected, load_pairs, to_pair, tokenize_pair
from reward.model import ensure_distinct_pad


def test_best_and_worst_by_hand():
    assert best_and_worst([0.0, 1.0, 0.5], 1e-6) == (1, 0)
    assert best_and_worst([0.25, 0.25, 1.0, 1.0], 1e-6) == (2, 0)  # ties go to the earliest sample
    assert best_and_worst([0.5, 0.5], 1e-6) is None  # all tied: no pair
    assert best_and_worst([0.0, 0.3], 0.5) is None  # gap below min_gap
    assert best_and_worst([0.0, 0.5], 0.5) == (1, 0)


def _args(**overrides) -> argparse.Namespace:
    base = dict(model="tiny-llama", prompts="builtin:prompts_eval", judge="gold", out="pairs.jsonl",
                num_prompts=6, samples=3, temperature=1.0, max_new_tokens=6, min_gap=1e-6,
                batch_size=4, max_length=256, seed=0, trust_remote_code=False)
    base.update(overrides)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    path = resolve_model_path("tiny-llama")
    tok = load_tokenizer(path)
    model = load_model(path, "reward").eval()
    ensure_distinct_pad(tok, model)
    with torch.no_grad():  # a unit-std head: rewards differ between any two responses
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(0)))
    out = tmp_path_factory.mktemp("judge") / "rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stopping_policy(tmp_path_factory):
    """The tiny random Llama with a larger EOS row in its (tied) output layer: within 6 new tokens some samples
    stop and some are cut by max_new_tokens."""
    path = resolve_model_path("tiny-llama")
    tok = load_tokenizer(path)
    model = load_model(path).eval()
    with torch.no_grad():
        row = model.get_output_embeddings().weight[tok.eos_token_id]
        row.copy_(torch.randn(row.shape, generator=torch.Generator().manual_seed(0)) * 0.6)
    out = tmp_path_factory.mktemp("policy") / "stopping"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_pairs_with_reward_model_judge(tmp_path, tiny_judge, stopping_policy):
    out = tmp_path / "pairs.jsonl"
    report = make_pairs(_args(model=str(stopping_policy), judge=str(tiny_judge), out=str(out)))
    assert (report.prompts, report.samples, report.dropped_all_tied) == (6, 18, 0)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == report.pairs == 6
    for record in records:
        assert record["score_chosen"] > record["score_rejected"]
        assert record["prompt"][-1]["role"] == "user" and record["chosen"][0]["role"] == "assistant"
    # Judge-vs-gold agreement is only counted where gold orders the two responses.
    golds = {row.data["id"]: row.data["gold"] for row in read_rows("builtin:prompts_eval")}
    orderable = sum(task.score(golds[r["id"]], r["chosen"][0]["content"])
                    != task.score(golds[r["id"]], r["rejected"][0]["content"]) for r in records)
    assert report.judged_against_gold == orderable
    assert json.loads((tmp_path / "pairs.report.json").read_text())["pairs"] == 6

    # The file is a preference dataset like any other: the shared loaders read every row
    # (pairs whose two samples decode to the same text are the loaders' to drop and count).
    tok = load_tokenizer(resolve_model_path("tiny-llama"))
    data_report = DataReport("pairs")
    pairs = load_pairs(read_rows(str(out)), tok, DataConfig(train=str(out), max_length=128), None, data_report)
    assert data_report.rows_read == 6 and len(pairs) + sum(data_report.dropped.values()) == 6

    # A sample cut by max_new_tokens is written as truncated, and the loaders train it as sampled: no end of
    # turn the policy never produced (FAILURES row 11). Finished samples end with it. The same seed draws the
    # same samples again.
    policy = load_model(str(stopping_policy)).eval()
    rows = read_rows("builtin:prompts_eval")
    prompts = [row.data["prompt"] for row in random.Random(0).sample(rows, len(rows))[:6]]  # make_pairs' draw
    samples = sample_responses(policy, load_tokenizer(str(stopping_policy)), prompts, 3, 1.0, 6, 4, 0)
    flags = {s.text: s.truncated for group in samples for s in group}
    assert report.truncated_samples == sum(s.truncated for group in samples for s in group)
    assert 0 < report.truncated_samples < report.samples, "a mix of finished and cut samples"
    written = [(r[side][0]["content"], r[f"{side}_truncated"]) for r in records for side in ("chosen", "rejected")]
    assert all(flags[content] == truncated for content, truncated in written)
    assert report.truncated_in_pairs == sum(truncated for _, truncated in written) > 0
    for record in records:
        try:
            pair = tokenize_pair(to_pair(Row(record, "pairs.jsonl")), tok, 128, None, DataReport("t"))
        except PairRejected:
            continue
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            assert (ids[-1] == tok.eos_token_id) != record[f"{side}_truncated"], (side, record)
    # The judge read each sample as the RM stage and `align ppo` read it: a truncated one without an end of turn.
    from reward.scorer import RewardScorer
    from reward.scorer import sequence_ids

    scorer = RewardScorer(tiny_judge)
    for record in records:
        for side in ("chosen", "rejected"):
            ids = sequence_ids(scorer.tokenizer, record["prompt"], record[side], 256,
                               ended=not record[f"{side}_truncated"])
            assert scorer.score_ids([ids]).item() == pytest.approx(record[f"score_{side}"], abs=1e-4), side

    again = tmp_path / "again.jsonl"
    make_pairs(_args(model=str(stopping_policy), judge=str(tiny_judge), out=str(again)))
    assert again.read_text() == out.read_text()


def test_gold_judge_needs_gold_specs(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl:1.*'gold'"):
        make_pairs(_args(prompts=str(prompts), out=str(tmp_path / "p.jsonl")))


def test_reference_chosen_pairs_the_right_answer_with_the_worst_wrong_sample(tmp_path, monkeypatch):
    # The tiny random model answers everything wrong: every prompt gives a pair, the reference answer
    # (full credit, rendered in the requested format) against the lowest-scoring sample.
    out = tmp_path / "pairs.jsonl"
    report = make_pairs(_args(out=str(out), chosen="reference"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    golds = {row.data["id"]: row.data["gold"] for row in read_rows("builtin:prompts_eval")}
    assert len(records) == report.pairs == report.prompts - report.dropped_all_tied == 6
    for record in records:
        gold = golds[record["id"]]
        chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
        assert chosen == task.render_answer(gold["expected"], gold["format"]) and task.score(gold, chosen) == 1.0
        assert record["score_rejected"] == task.score(gold, rejected) < 1.0

    # A prompt whose samples are all right has nothing to reject: dropped and counted, never written.
    from alignment.collect import pairs as pairs_module

    answers = {row.data["prompt"][-1]["content"]: task.render_answer(row.data["gold"]["expected"],
                                                                   row.data["gold"]["format"])
               for row in read_rows("builtin:prompts_eval")}
    first = next(iter(answers))

    def fake_samples(model, tokenizer, prompts, samples, *args):
        return [[Sample(answers[p[-1]["content"]] if p[-1]["content"] == first else "no idea", truncated=False)]
                * samples for p in prompts]

    monkeypatch.setattr(pairs_module, "sample_responses", fake_samples)
    monkeypatch.setattr(pairs_module.random, "Random", lambda seed: type("R", (), {"sample": lambda self, r, n: r})())
    report = make_pairs(_args(out=str(tmp_path / "all-right.jsonl"), chosen="reference"))
    assert (report.prompts, report.pairs, report.dropped_all_tied) == (6, 5, 1)

    with pytest.raises(DataError, match="--judge gold"):
        make_pairs(_args(out=str(tmp_path / "x.jsonl"), chosen="reference", judge="some/rm"))


def test_missing_eos_penalty_ranks_a_truncated_answer_below_a_finished_one(tmp_path, monkeypatch):
    # As ppo.missing_eos_penalty: the right answer cut by max_new_tokens scores 1 - 1.5 and is rejected against a
    # finished wrong answer (0); without the penalty it is chosen.
    from alignment.collect import pairs as pairs_module

    row = read_rows("builtin:prompts_eval")[0]
    answer = task.render_answer(row.data["gold"]["expected"], row.data["gold"]["format"])
    monkeypatch.setattr(pairs_module, "sample_responses",
                        lambda *a: [[Sample(answer, truncated=True), Sample("no idea", truncated=False)]])
    monkeypatch.setattr(pairs_module.random, "Random", lambda seed: type("R", (), {"sample": lambda self, r, n: r})())
    plain = make_pairs(_args(out=str(tmp_path / "plain.jsonl"), num_prompts=1, samples=2))
    penalised = make_pairs(_args(out=str(tmp_path / "penalised.jsonl"), num_prompts=1, samples=2,
                                 missing_eos_penalty=1.5))
    assert plain.pairs == penalised.pairs == 1 and plain.truncated_samples == 1
    first = json.loads((tmp_path / "plain.jsonl").read_text())
    second = json.loads((tmp_path / "penalised.jsonl").read_text())
    assert (first["chosen"][0]["content"], first["chosen_truncated"], first["score_chosen"]) == (answer, True, 1.0)
    assert (second["chosen"][0]["content"], second["score_chosen"]) == ("no idea", 0.0)
    assert (second["rejected"][0]["content"], second["rejected_truncated"]) == (answer, True)
    assert second["score_rejected"] == pytest.approx(-0.5)
