"""Helpers shared by the side-by-side benchmarks (bench/sft.py, later rm/dpo).

A benchmark runs each side in its own subprocess (a fresh interpreter, same
environment and thread count), reads per-step token counts and wall times back,
drops the first warm-up steps on both sides and prints a table plus one line per
comparison that outside checks parse:

    RESULT name=<name> ours=<value> peer=<value> unit=<unit> ratio=<ours/peer>

Throughput is always "tokens over the timed steps / wall time of those steps",
where a step's wall time runs from the end of the previous optimizer step to the
end of this one (data collation, forward, backward, optimizer, logging: all of it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def setup_path() -> None:
    """Make `alignment` importable when a bench script is run as `python bench/x.py` from anywhere."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def smollm2_path() -> str:
    """Local HF directory of the built-in SmolLM2-135M-Instruct (converted from GGUF once, then cached)."""
    setup_path()
    from alignment.core.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


def default_precision() -> str:
    """Both sides' precision unless --precision says otherwise: bf16 where this machine runs bf16 matmuls fast,
    else fp32 (recipes' train.precision auto; on a CPU without oneDNN bf16 kernels bf16 is ~45x slower)."""
    setup_path()
    from alignment.core.precision import resolve_precision

    return resolve_precision("auto")[0]


def bench_env(extra: dict | None = None) -> dict:
    """Environment for both sides of a comparison: identical, quiet, offline, no trackers."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


PEAK_MIB: dict[str, float] = {}  # label -> peak resident memory of that side's whole process tree (MiB)


def watch_peak_rss(proc: subprocess.Popen, timeout: float | None, every: float = 0.1,
                   trace_path: Path | None = None) -> float:
    """Wait for `proc`, sampling the summed PSS (proportional set size: a shared library's pages split among
    the processes mapping it, so a launcher plus ranks is not charged libtorch once per process) of it and all
    its descendants; the peak in MiB. Sampling can miss a spike shorter than the interval (`every`, longer for
    large processes); both sides of a comparison are sampled the same way. With `trace_path`, every sample
    goes there as a JSON line (seconds since start, total MiB, MiB per process with its command line), so
    that a peak can be attributed to a phase or a child process."""
    import psutil

    peak, deadline = 0, (time.time() + timeout) if timeout else None
    root = psutil.Process(proc.pid)
    trace = open(trace_path, "w") if trace_path else None
    start = time.perf_counter()
    while proc.poll() is None:
        if deadline and time.time() > deadline:
            for p in root.children(recursive=True):
                p.kill()
            proc.kill()
            raise subprocess.TimeoutExpired(proc.args, timeout)
        total, sampled, parts = 0, time.perf_counter(), []
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    pss = p.memory_full_info().pss
                    total += pss
                    if trace:
                        parts.append([p.pid, round(pss / 2**20, 1), " ".join(p.cmdline()[1:4])[:120]])
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        if trace:
            trace.write(json.dumps({"t": round(sampled - start, 2), "mib": round(total / 2**20, 1), "procs": parts}) + "\n")
            trace.flush()
        # Reading PSS walks the page tables: ~0.1 s for a 13 GB process. Keep the sampler under ~10% of one core
        # so that it does not slow the side it measures (at 0.1 s intervals it took half a core).
        time.sleep(max(every, 9 * (time.perf_counter() - sampled)))
    proc.wait()
    if trace:
        trace.close()
    return peak / 2**20


def memory_line(name: str, ours_label: str, peer_label: str) -> str:
    """RESULT name=<name>-peak-memory: peak PSS of our side against the peer's (lower is better; goal <= 0.8)."""
    return result_line(f"{name}-peak-memory", PEAK_MIB[ours_label], PEAK_MIB[peer_label], "MiB")


def run_logged(cmd: list[str], log_path: Path, label: str, env: dict | None = None, timeout: float | None = None) -> float:
    """Run a side's subprocess with its output in log_path; returns its wall time. Fails loudly with the log tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{label}] $ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or bench_env(), stdout=log, stderr=subprocess.STDOUT)
        # The memory timeline lies next to the log (<log>.memory.jsonl), for attributing a peak to a phase.
        PEAK_MIB[label] = watch_peak_rss(proc, timeout, trace_path=log_path.with_suffix(".memory.jsonl"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"[{label}] exited with {proc.returncode} after {wall:.0f}s; log {log_path}:\n{tail}")
    print(f"[{label}] done in {wall:.0f}s (log: {log_path})", flush=True)
    return wall


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@dataclass
class StepLog:
    """Per optimizer step: tokens processed (non-padding input tokens), supervised targets, wall seconds."""

    tokens: list[float] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    losses: list = field(default_factory=list)  # per step when known (ours); (step, mean since last log) for TRL

    def add(self, tokens: float, targets: float, seconds: float) -> None:
        self.tokens.append(float(tokens))
        self.targets.append(float(targets))
        self.seconds.append(float(seconds))

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "targets": self.targets, "seconds": self.seconds, "losses": self.losses}

    @classmethod
    def from_dict(cls, data: dict) -> "StepLog":
        return cls(list(data["tokens"]), list(data["targets"]), list(data["seconds"]), list(data.get("losses", [])))


@dataclass
class Throughput:
    name: str
    steps: int  # timed steps
    tokens: float  # tokens over the timed steps
    seconds: float  # wall time of the timed steps
    all_steps: int
    all_tokens: float
    all_targets: float  # supervised tokens over every step (warm-up included)
    step_seconds: list[float]

    @property
    def rate(self) -> float:
        return self.tokens / max(self.seconds, 1e-12)


def steady_throughput(name: str, log: StepLog, skip: int) -> Throughput:
    """Tokens/s over steps skip+1..N (the first `skip` steps are warm-up: allocator, oneDNN kernels, lazy init)."""
    n = len(log.seconds)
    if n <= skip:
        raise ValueError(f"{name}: only {n} steps logged, need more than the {skip} warm-up steps")
    return Throughput(
        name=name,
        steps=n - skip,
        tokens=sum(log.tokens[skip:]),
        seconds=sum(log.seconds[skip:]),
        all_steps=n,
        all_tokens=sum(log.tokens),
        all_targets=sum(log.targets),
        step_seconds=log.seconds,
    )


def print_table(rows: Iterable[Throughput], skip: int) -> None:
    rows = list(rows)
    print(f"\n{'side':<10} {'timed steps':>11} {'tokens':>9} {'seconds':>9} {'tokens/s':>10} "
          f"{'s/step':>8} {'all steps':>9} {'all tokens':>10} {'supervised':>10}")
    for r in rows:
        print(f"{r.name:<10} {r.steps:>11d} {r.tokens:>9.0f} {r.seconds:>9.2f} {r.rate:>10.1f} "
              f"{r.seconds / r.steps:>8.3f} {r.all_steps:>9d} {r.all_tokens:>10.0f} {r.all_targets:>10.0f}")
    print(f"(first {skip} steps of each side are warm-up, not timed; 'supervised' = next-token targets "
          f"with loss, all steps)")
    for r in rows:
        print(f"  {r.name} s/step: " + " ".join(f"{s:.2f}" for s in r.step_seconds))


def result_line(name: str, ours: float, peer: float, unit: str, digits: int = 2) -> str:
    ratio = ours / peer if peer > 0 else float("inf")
    line = f"RESULT name={name} ours={ours:.{digits}f} peer={peer:.{digits}f} unit={unit} ratio={ratio:.3f}"
    print(line, flush=True)
    return line


def ours_steps_from_metrics(metrics_path: Path) -> StepLog:
    """Per-step tokens/targets/seconds from one of our runs' metrics.jsonl (train/tokens, train/tokens_per_s)."""
    log = StepLog()
    for record in read_jsonl(metrics_path):
        if "train/tokens" not in record:
            continue
        log.losses.append(record.get("loss"))
        tokens = record["train/tokens"]
        rate = record["train/tokens_per_s"]
        log.add(tokens, record.get("train/targets", 0.0), tokens / rate if rate else 0.0)
    return log


def make_step_clock():
    """A transformers TrainerCallback that records the wall time of every optimizer step.

    A step runs from the previous step's `on_step_end` (or `on_train_begin`) to its own
    `on_step_end`, so it includes fetching/collating the batch and the trainer's logging,
    like our loop's Clock.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last = None
            self.seconds: list[float] = []
            self.losses: list[tuple[int, float]] = []  # (step, mean train loss since the previous log)

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))

    return StepClock()


class CountingCollator:
    """Wraps a trainer's data collator to count, per batch, non-padding input tokens and supervised targets.

    Costs two reductions over a [B, T] integer tensor per batch; the wrapped collator's output is unchanged.
    """

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[float] = []
        self.targets: list[float] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens.append(float(batch["attention_mask"].sum()))
        self.targets.append(float((batch["labels"][:, 1:] != -100).sum()))
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
