"""Decoding under ZeRO-3 (FAILURES rows 6 and 7): the weights are gathered once per rollout and decoding
runs without ZeRO's hooks, so all-gathers do not grow with the number of new tokens, ranks that stop at
different steps do not deadlock, and the greedy tokens are the unsharded model's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, align_cache, child_env  # noqa: F401
from alignment.core.distributed import free_port


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_decoding_is_hook_free_and_matches_unsharded(tmp_path, align_cache):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "rlhf" / "zero3_rollout_probe.py"), str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        hooked_4, hooked_8 = facts["hooked"]
        assert hooked_8 > hooked_4 > 0, f"the counter sees ZeRO's per-token gathers: {facts['hooked']}"
        assert facts["viewed"] == [0, 0], f"decoding through the generation view gathered: {facts['viewed']}"
        assert facts["stopped_lengths"] == ([2, 2] if rank == 0 else [6, 6])
        assert facts["greedy"] == facts["greedy_unsharded"]
        assert facts["after_finite"]
