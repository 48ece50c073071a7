"""The gold score cache: a stage's "before" is its parent's "after" when the weights, prompts and decoding
match, and any change to the weights is a miss."""

from __future__ import annotations

import contextlib
import shutil
from types import SimpleNamespace

import torch

from alignment.core.recipes import GoldEvalConfig
from alignment.core.models import load_model, load_tokenizer, resolve_model_path
from alignment.evaluate import gold


def _engine():
    dist = SimpleNamespace(world_size=1, rank=0, is_main=True, device=torch.device("cpu"),
                           reduce_sums=lambda sums: dict(sums))
    return SimpleNamespace(dist=dist, plain_init=contextlib.nullcontext)


def test_gold_scores_are_cached_by_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    src = resolve_model_path("tiny-llama")
    model_dir = tmp_path / "model"
    load_model(src).save_pretrained(model_dir)
    load_tokenizer(src).save_pretrained(model_dir)
    cfg = GoldEvalConfig(prompts="builtin:prompts_eval", num_prompts=4, max_new_tokens=3, batch_size=2)
    calls = []
    real = gold.gold_score
    monkeypatch.setattr(gold, "gold_score", lambda *a, **k: calls.append(a[1]) or real(*a, **k))

    first = gold.gold_eval(_engine(), str(model_dir), cfg, samples_to=tmp_path / "a.jsonl")
    second = gold.gold_eval(_engine(), str(model_dir), cfg, samples_to=tmp_path / "b.jsonl")
    assert len(calls) == 1 and first == second
    assert "(cached" in capsys.readouterr().out
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()

    # other decoding, other prompts count, or other weights: generated again
    gold.gold_eval(_engine(), str(model_dir), GoldEvalConfig(prompts=cfg.prompts, num_prompts=4, max_new_tokens=4,
                                                             batch_size=2))
    assert len(calls) == 2
    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed)
    model = load_model(str(changed))
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(changed)
    gold.gold_eval(_engine(), str(changed), cfg)
    assert len(calls) == 3


def test_a_rank_without_the_entry_makes_every_rank_generate(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    src = resolve_model_path("tiny-llama")
    cfg = GoldEvalConfig(prompts="builtin:prompts_eval", num_prompts=2, max_new_tokens=2, batch_size=2)
    engine = _engine()
    engine.dist.world_size = 2  # rank 0 of 2; reduce_sums as the identity: the other rank has no entry
    calls = []
    real = gold.gold_score
    monkeypatch.setattr(gold, "gold_score", lambda *a, **k: calls.append(1) or real(*a, **k))
    gold.gold_eval(engine, src, cfg)
    gold.gold_eval(engine, src, cfg)  # this rank holds the entry now, the other does not
    assert calls == [1, 1]
    engine.dist.reduce_sums = lambda sums: {k: 2 * v for k, v in sums.items()}  # both ranks hold it
    gold.gold_eval(engine, src, cfg)
    assert calls == [1, 1]
