"""Two local ranks through `--nproc 2` (DeepSpeed's launcher, gloo on CPU).

The loss of a step is the mean over the whole global batch, so 1 rank and 2 ranks must give the
same curve; a rank that fails must end the whole job quickly, leaving no process behind
(FAILURES.md row 19).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import align_cache, run_sft, step_metrics, surviving_processes  # noqa: F401

pytestmark = pytest.mark.slow

COMMON = ("train.global_batch_size=8", "train.eval_interval=0", "train.save_interval=0", "data.eval=null")


def deepspeed_shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, align_cache):
    """The reference: 1 rank, micro 4 x accumulation 2, ZeRO-2."""
    out = tmp_path_factory.mktemp("dist") / "r1"
    run_sft(out, *COMMON, "train.micro_batch_size=4", "deepspeed.zero_stage=2", steps=6).check()
    return step_metrics(out)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_one_rank_and_two_ranks_give_the_same_loss_curve(tmp_path, one_rank, zero_stage):
    """2 ranks x micro 2 x accumulation 2 (ZeRO-2 and ZeRO-3) against 1 rank x micro 4 x accumulation 2."""
    out = tmp_path / "r2"
    shm_before = deepspeed_shm_buffers()
    run_sft(out, *COMMON, "train.micro_batch_size=2", f"deepspeed.zero_stage={zero_stage}", steps=6, nproc=2).check()
    # DeepSpeed's CPU comm op leaves a 66 MB /dev/shm buffer per rank unless the engine unlinks it.
    assert deepspeed_shm_buffers() <= shm_before, "the run left DeepSpeed shm buffers in /dev/shm"
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["batch"]["grad_accum_steps"] == 2
    two = step_metrics(out)
    assert sorted(one_rank) == sorted(two) == list(range(1, 7))
    for s in one_rank:
        assert two[s]["train/targets"] == one_rank[s]["train/targets"], f"step {s}: the global batch differs"
        assert two[s]["train/tokens"] == one_rank[s]["train/tokens"], f"step {s}: the global batch differs"
        assert two[s]["loss"] == pytest.approx(one_rank[s]["loss"], rel=1e-5, abs=0), f"step {s}"
        # Adam + clipping would hide a constant gradient scale error (e.g. a missing x world size): check the norm.
        assert two[s]["train/grad_norm"] == pytest.approx(one_rank[s]["train/grad_norm"], rel=1e-5), f"step {s}"
        assert two[s]["train/lr"] == pytest.approx(one_rank[s]["train/lr"], rel=1e-9), f"step {s}"
    assert one_rank[6]["loss"] < one_rank[1]["loss"] - 0.3, "the curve moves, so equal curves mean equal updates"


@pytest.mark.timeout(180)
def test_failing_rank_ends_the_job(tmp_path, align_cache):
    out = tmp_path / "fail-rank1"
    shm_before = deepspeed_shm_buffers()
    started = time.monotonic()
    result = run_sft(out, *COMMON, "train.micro_batch_size=4", "deepspeed.zero_stage=2", steps=6, nproc=2, timeout=120,
                     env={"ALIGN_DEBUG_FAIL_AT_STEP": "2", "ALIGN_DEBUG_FAIL_RANK": "1"})
    elapsed = time.monotonic() - started
    assert not result.timed_out, f"the job hung: killed after {result.seconds:.0f}s\n{result.output[-4000:]}"
    assert result.returncode != 0, result.output[-4000:]
    assert elapsed < 60, f"the job took {elapsed:.0f}s to fail"
    assert "injected failure at step 2 on rank 1" in result.output, result.output[-4000:]
    assert "[rank 1] align sft failed" in result.output
    assert not (out / "final").exists()
    # rank 0 logged step 1 and nothing past the failure
    assert sorted(step_metrics(out)) == [1]
    # give the OS a moment to reap, then nothing of this run may be alive: no process naming its output
    # dir, and nothing left in the session the run was started in (the launcher, ranks, verify children)
    deadline = time.monotonic() + 5
    while (alive := surviving_processes(str(out), session=result.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes of the failed run survive: {alive}"
    assert deepspeed_shm_buffers() <= shm_before, "the failed run left DeepSpeed shm buffers in /dev/shm"
