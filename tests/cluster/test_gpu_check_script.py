"""bench.gpu_check stays ready to run: its --smoke mode (CPU, tiny model) goes through the same code."""

import subprocess
import sys

import pytest

from helpers import REPO, align_cache, child_env  # noqa: F401


@pytest.mark.slow
def test_gpu_check_smoke_runs_and_prints_result_lines(align_cache):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--only", "sft-zero2", "ppo-zero3"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    names = [line.split()[1] for line in lines]
    assert names == ["name=gpu-sft-zero2-tokens-per-s", "name=gpu-sft-zero2-mfu", "name=gpu-ppo-zero3-tokens-per-s",
                     "name=gpu-ppo-zero3-mfu"]
    assert all(float(line.split("ours=")[1].split()[0]) > 0 for line in lines if "tokens-per-s" in line)
