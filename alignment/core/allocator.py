"""Host memory settings for training processes: glibc's malloc (where CPU tensors live) and oneDNN's
primitive cache (CPU matmuls).

Why. glibc serves an allocation from its heap unless it is at least the mmap threshold, and that
threshold is dynamic: every time a chunk that was mmapped is freed, the threshold rises to that
chunk's size (up to 32 MiB). After the first freed activation, nearly every tensor a training step
makes (activations, per-parameter gradients: 0.5-32 MiB for a 135M model) goes to the heap, where
freed chunks between long-lived ones cannot go back to the OS. Measured here on `bench/sft.py`'s
SmolLM2-135M full fine-tune: peak PSS 5,030 MiB with glibc's defaults, 3,450 MiB with a fixed 512 KiB
threshold, at the same tokens/s within noise (172 against 175-182); 128-256 KiB cost 10-15% of the
speed (every mmapped block is faulted in again), 2-4 MiB saved almost nothing.

What. :func:`tune_host_allocator` fixes the mmap threshold at 512 KiB (which also switches the dynamic
rise off) and sets the trim threshold to 32 MiB (free memory at the top of the heap goes back once
it passes that), for the workloads in MALLOC_WORKLOADS (:func:`workload`: sft, and ppo's critic-free
family). It changes where memory comes from, never what is computed. Where it costs speed, glibc's
default stays (measured, bench/ppo.py, 2026-12-03, the fixed threshold against glibc's default):
- GRPO: 3.23 against 3.03 episodes/s, peak 3,756 against 4,199 MiB (TRL: 1.80 episodes/s, 5,029 MiB):
  fixed.
- PPO with a critic: 1.21 against 1.66 episodes/s, peak 5,506 against 6,159 MiB (TRL: 0.81-0.85
  episodes/s, 8,343-8,450 MiB): the update (actor and critic, fresh pages faulted in for both every
  micro-batch; system time 45 s against 18 s over 3 iterations) went from 5-6 s to 8-9 s, so glibc's.
- rm, dpo: see MALLOC_WORKLOADS.
- GRPO in fp32 on a 2-core AVX2 CPU (no fast bf16; 2026-12-03): the other way round for speed,
  0.89 against 1.11 episodes/s (glibc's dynamic threshold, oneDNN cap kept), peak 3,653 against
  4,145 MiB (TRL: 0.57 episodes/s, 5,152 MiB). Kept fixed: it holds the 0.8x-of-TRL memory goal there
  and was faster in bf16; ALIGN_MALLOC=system is the faster choice on such a machine (README table).

Where glibc's dynamic threshold stays for the pair stages (rm, dpo), :func:`trim_heap` runs after every
optimizer step (core.loop.accumulated_step): malloc_trim(0) hands the heap's free pages back, so the holes a
step's freed activations leave below live blocks do not stay resident into the next step. Pages are faulted
in again once per step, not per allocation as under a fixed threshold. bench/rm.py (bf16, 2026-12-05): peak
5,648 -> 5,376 and 5,517 MiB (two runs), timed steps no slower (TRL: 6,926-7,029 MiB).

oneDNN (PyTorch's CPU matmul and convolution library) caches a compiled primitive, with its buffers,
for every distinct problem shape, up to 1,024 of them. A training run meets new shapes all the time
(every padded length, every rollout length), so the cache, and the process, grew by 40-80 MiB per PPO
iteration here (GRPO on SmolLM2-135M, 9 iterations: peak 4,332 MiB, still rising). With a capacity
of 64 it stays flat: 3,706 against 4,058 MiB after 4 iterations at the same update time (10.4 s);
8 entries thrashed (update time +45%), 32 and 64 did not. :func:`tune_host_allocator` sets
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=64`` before torch loads, unless the environment sets it.

Opt out of both with ``ALIGN_MALLOC=system``. A threshold the user set (``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` in the environment, read by glibc itself) is left as it is. Off glibc
(macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 512 * 1024
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
ONEDNN_CACHE_CAPACITY = "64"

_state = "not set"
_trim = None  # libc's malloc_trim where step-boundary trimming is on (see trim_heap)


# Workloads whose steps move few activation bytes: the fixed threshold costs them no speed. The pair stages
# (rm, dpo: chosen + rejected at 192-512 tokens) fault in gigabytes of fresh pages per step through it:
# bench/rm.py went from 1.5 to 0.93 pairs/s (peak 7,009 -> 4,954 MiB), so they keep glibc's threshold,
# as does PPO with a critic ("ppo-critic", see the module docstring).
MALLOC_WORKLOADS = ("sft", "ppo")
# Of the others, those that trim the heap after every optimizer step (trim_heap; measured on bench/rm.py). PPO with
# a critic steps once per minibatch per model, with its speed goal measured without it: left alone.
TRIM_WORKLOADS = ("rm", "dpo")


def workload(stage: str | None, recipe=None) -> str | None:
    """What the malloc rule keys on: the stage, and for ppo whether a critic trains beside the actor."""
    if stage == "ppo" and getattr(getattr(recipe, "ppo", None), "advantage", None) == "gae":
        return "ppo-critic"
    return stage


def fixes_mmap_threshold(stage: str | None, recipe=None) -> bool:
    """Whether `align <stage>` with this recipe fixes glibc's mmap threshold (ALIGN_MALLOC, else
    MALLOC_WORKLOADS)."""
    choice = os.environ.get("ALIGN_MALLOC", "").lower()
    return choice != "system" and (choice == "tuned" or workload(stage, recipe) in MALLOC_WORKLOADS)


def cap_onednn_cache() -> str:
    """The oneDNN part alone, for the start of a process that does not know its recipe yet: it must run
    before torch loads. Returns the capacity in force ("" under ALIGN_MALLOC=system)."""
    if os.environ.get("ALIGN_MALLOC", "").lower() == "system":
        return ""
    # Read by oneDNN when torch first uses it; children (ranks, the export check) inherit it.
    return os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def tune_host_allocator(stage: str | None = None, recipe=None) -> str:
    """Apply the settings above once per process; returns (and remembers) what was done, for run logs.

    `stage` (the align subcommand) and its recipe choose the malloc part (:func:`fixes_mmap_threshold`);
    ``ALIGN_MALLOC=tuned`` turns it on for any stage, ``ALIGN_MALLOC=system`` turns everything off.
    mallopt applies to the allocations after it, so this may run once the recipe is read, before the
    models load; the oneDNN cap must come before torch loads (:func:`cap_onednn_cache`)."""
    global _state
    if _state != "not set":
        return _state
    if os.environ.get("ALIGN_MALLOC", "").lower() == "system":
        _state = "system defaults (ALIGN_MALLOC=system)"
        return _state
    global _trim
    onednn = cap_onednn_cache()
    if not fixes_mmap_threshold(stage, recipe):
        malloc = f"glibc's default ({workload(stage, recipe)}; ALIGN_MALLOC=tuned to fix the mmap threshold)"
        libc = _glibc()
        if workload(stage, recipe) in TRIM_WORKLOADS and libc is not None:
            _trim = libc.malloc_trim
            malloc += ", heap trimmed after each optimizer step"
    elif any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        malloc = "the environment's MALLOC_*_THRESHOLD_"
    elif _glibc() is None:
        malloc = "system defaults (not glibc)"
    else:
        libc = _glibc()
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
        malloc = (f"glibc, mmap threshold {MMAP_THRESHOLD_BYTES // 1024} KiB, trim threshold "
                  f"{TRIM_THRESHOLD_BYTES // 2**20} MiB" if ok else "system defaults (mallopt refused)")
    _state = f"malloc: {malloc}; oneDNN primitive cache: {onednn}"
    return _state


def _glibc():
    """The C library when it is glibc on Linux (mallopt, malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def host_allocator_state() -> str:
    return _state


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim), where glibc's dynamic mmap threshold is
    kept: called once per optimizer step, so a step's freed activations and gradient buffers do not stay
    resident as heap holes between steps, at the cost of faulting those pages in again once per step rather
    than per allocation (the fixed threshold's cost)."""
    if _trim is not None:
        _trim(0)
