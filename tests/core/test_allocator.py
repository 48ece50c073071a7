"""alignment.core.allocator: a 600 KiB block after a freed 3 MiB one is mmapped (returned to the OS when
freed) with our settings, and comes from the heap under glibc's dynamic threshold. Each case runs in a
fresh interpreter, since mallopt settings are per process."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

PROBE = r"""
import ctypes, os, sys, types
from alignment.core.allocator import tune_host_allocator
recipe = types.SimpleNamespace(ppo=types.SimpleNamespace(advantage=sys.argv[3])) if sys.argv[3] else None
state = tune_host_allocator(sys.argv[2], recipe) if sys.argv[1] == "tune" else "untouched"
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(3 << 20))  # glibc's default: the mmap threshold rises to 3 MiB here
block = libc.malloc(600 << 10)
lo, hi = 0, 0
for line in open("/proc/self/maps"):
    if "[heap]" in line:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
assert sys.argv[1] != "tune" or "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ or "system" in state
print(("heap" if lo <= block < hi else "mmap") + "|" + state)
"""


def probe(mode: str, stage: str = "sft", advantage: str = "", **env_extra) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ALIGN_MALLOC", "ONEDNN_"))}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE, mode, stage, advantage], env=env, capture_output=True, text=True, check=True)
    where, state = out.stdout.strip().split("|")
    return where, state


def test_default_glibc_puts_a_mid_sized_block_on_the_heap():
    assert probe("none")[0] == "heap"  # the behaviour the module works around (else the test below proves nothing)


def test_tuned_allocator_mmaps_mid_sized_blocks():
    where, state = probe("tune")
    assert where == "mmap"
    assert state == "malloc: glibc, mmap threshold 512 KiB, trim threshold 32 MiB; oneDNN primitive cache: 64"


def test_pair_stages_keep_glibcs_threshold_unless_asked():
    where, state = probe("tune", "rm")
    assert where == "heap" and state.startswith("malloc: glibc's default (rm;")
    assert probe("tune", "dpo", ALIGN_MALLOC="tuned")[0] == "mmap"


def test_ppo_with_a_critic_keeps_glibcs_threshold_and_the_critic_free_family_fixes_it():
    where, state = probe("tune", "ppo", "gae")
    assert where == "heap" and state.startswith("malloc: glibc's default (ppo-critic;")
    assert probe("tune", "ppo", "grpo")[0] == "mmap"
    assert probe("tune", "ppo", "rloo")[0] == "mmap"


def test_the_cli_chooses_the_setting_from_the_recipe(tmp_path):
    """`align ppo` reads the recipe before it decides (the recipe's advantage picks the workload); the
    decision lands in run_info.json. A 1-iteration tiny GAE run, with the allocator state checked."""
    import json

    out = tmp_path / "ppo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ALIGN_MALLOC", "ONEDNN_"))}
    subprocess.run([sys.executable, "-m", "alignment.cli", "ppo", "configs/tiny/ppo.yaml", "--set", f"output_dir={out}",
                    "--set", "train.max_steps=1", "--set", "ppo.gold_eval.prompts=null"], env=env, check=True,
                   capture_output=True)
    state = json.loads((out / "run_info.json").read_text())["host_allocator"]
    assert state == ("malloc: glibc's default (ppo-critic; ALIGN_MALLOC=tuned to fix the mmap threshold); "
                     "oneDNN primitive cache: 64")


def test_opt_out_and_user_thresholds_are_respected():
    where, state = probe("tune", ALIGN_MALLOC="system")
    assert (where, state) == ("heap", "system defaults (ALIGN_MALLOC=system)")
    where, state = probe("tune", MALLOC_TRIM_THRESHOLD_="134217728", ONEDNN_PRIMITIVE_CACHE_CAPACITY="512")
    assert state == "malloc: the environment's MALLOC_*_THRESHOLD_; oneDNN primitive cache: 512"


def test_run_info_records_the_allocator_setting():
    from alignment.core.allocator import host_allocator_state
    from alignment.core.tracking import run_info

    assert run_info(0, 1, "sft")["host_allocator"] == host_allocator_state()


TRIM_PROBE = r"""
import ctypes, sys
from alignment.core.allocator import tune_host_allocator, trim_heap
state = tune_host_allocator(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(3 << 20))  # under glibc's dynamic threshold the blocks below now come from the heap
blocks = [libc.malloc(600 << 10) for _ in range(200)]
for b in blocks:
    ctypes.memset(b, 1, 600 << 10)  # resident
pin = libc.malloc(600 << 10)  # from the heap's top, above them: free() only ever trims the top
for b in blocks:
    libc.free(b)
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
before = resident()
trim_heap()
print(f"{before - resident()}|{state}")
"""


def test_stages_on_glibcs_threshold_give_freed_heap_pages_back_at_each_step():
    """A step's freed activations sit in the heap below live blocks, where free() cannot return them; trim_heap,
    called after every optimizer step (loop.accumulated_step), gives them back (bench/rm.py's peak, bf16:
    5,648 -> 5,376 MiB, no slower). Under the fixed threshold such blocks are mmapped already: nothing to do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ALIGN_MALLOC", "ONEDNN_"))}
    out = {}
    for stage in ("rm", "sft"):
        run = subprocess.run([sys.executable, "-c", TRIM_PROBE, stage], env=env, capture_output=True, text=True,
                             check=True)
        released, state = run.stdout.strip().split("|")
        out[stage] = (int(released), state)
    assert out["rm"][0] > 80, out  # ~117 MiB freed below the pin
    assert "heap trimmed after each optimizer step" in out["rm"][1]
    assert out["sft"][0] < 20 and "heap trimmed" not in out["sft"][1], out
