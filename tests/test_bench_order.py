"""The quality benchmarks give TRL, which reads its rows in order, the batches our stages train on: each of its
batches is ours of the same step (KTO), each of its rollouts ours of the same iteration (GRPO)."""

from __future__ import annotations

from types import SimpleNamespace

from alignment.data.sampler import GlobalBatchSampler
from alignment.data.sources import Row
from alignment.rlhf.episodes import rollout_prompts
from bench.grpo_quality import prompts_in_our_order
from bench.kto_quality import in_our_order


def test_kto_rows_in_our_sampler_order_across_epochs():
    rows = [{"id": i} for i in range(20)]  # 2 steps of 8 an epoch, 4 left out of each epoch
    trl = in_our_order(rows, batch=8, steps=5)
    layout = SimpleNamespace(global_batch_size=8, micro_batch_size=8, grad_accum_steps=1, world_size=1)
    sampler = GlobalBatchSampler(len(rows), layout, seed=0)
    ours = [[rows[i] for i in sampler.micro_batches(step, 0)[0]] for step in range(5)]
    assert [trl[8 * s : 8 * s + 8] for s in range(5)] == ours
    assert trl[:8] != rows[:8]  # shuffled, and reshuffled each epoch
    assert trl[16:24] != trl[:8]


def test_grpo_prompts_in_our_rollout_order():
    rows = [Row({"id": i}, f"x:{i}") for i in range(30)]
    trl = prompts_in_our_order(rows, per_rollout=8, iterations=6, seed=3)
    for it in range(1, 7):
        assert [r["id"] for r in trl[8 * (it - 1) : 8 * it]] == rollout_prompts(30, 8, it, 3)
