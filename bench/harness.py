"""What the two sides of every comparison share: how a side is run, timed, measured and reported.

Sides. Each side runs in its own subprocess (a fresh interpreter, started from the repository root with the
same environment and CPU thread count: `side_env`), with its output in a log and its process tree's peak
memory sampled (`run_logged`). Ours is the real stage, `python -m alignment.cli STAGE RECIPE --set ...`
(`run_stage`), or the same `alignment.cli.main` in a thin wrapper process that also reads the process CPU
time of every step (`run_ours_worker`, `run_cli_worker`). TRL's side, and any other worker, is the
benchmark's own module in worker mode, `python -m bench.NAME --worker KIND SPEC.json` (`run_worker`,
`serve_worker`): the spec names the result file the worker writes.

Timing. A step's wall time runs from the end of the previous optimizer step to the end of this one, on both
sides (data collation, forward, backward, optimizer, logging: all of it): ours is the stage's own Clock
(alignment.core.loop.Clock: `lap()` per optimizer step, `lap(name)` per named phase of an RL iteration),
read back from metrics.jsonl; TRL's is a TrainerCallback (`step_clock`), with a collator wrapper
(`CountingCollator`) counting each micro-batch's pairs, non-padding tokens and supervised targets. Each
step's process CPU time (all threads, user + system) is recorded over the same interval where a benchmark
reports it (ours through the worker's Clock wrapper; TRL through the same callback). The first `warmup`
steps of each side are not timed; throughput is units over the timed steps / their wall time (`Row`).

Memory. The peak of a side is the largest summed PSS (proportional set size) of its process and all its
descendants, sampled while it runs; the timeline lies next to its log (`<side>.memory.jsonl`: PSS per
process), for attributing a peak to a phase or a child. `memory_line` reports ours against the peer.

Results: `print_table` (one row per side) and one line per comparison that outside checks parse:

    RESULT name=<name> ours=<value> peer=<value> unit=<unit> ratio=<ours/peer>

Quality (bench.rm_quality, bench.dpo_quality, bench.kto_quality). Both exports are scored the plain way, the same for both, in
fp32, one conversation at a time (no padding), on held-out pairs neither side saw (bench.data):
- reward model: AutoModelForSequenceClassification, the tokenizer's chat template over the whole
  conversation (prompt + response), the reward transformers pools at the last token; accuracy = share of
  held-out pairs with r(chosen) > r(rejected) (`plain_reward_accuracy`).
- DPO policy: AutoModelForCausalLM; log p(response | prompt) = the sum of the token log-probs of the
  conversation's tokens after the prompt rendered with add_generation_prompt=True (`response_logps`);
  implicit reward = log p_policy - log p_start (beta does not change the sign); accuracy = share with
  implicit reward of chosen > rejected (`implicit_reward_accuracy`). A KTO policy is scored the same way.
The two sides are compared pair by pair as well (`paired_difference`: the mean per-pair difference of
correctness and its standard error), tighter than the two accuracies' own errors when the sides agree on most pairs.
Held-out conversations are scored whole, however long (no truncation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bench.data import (HELD_FRACTION, REPO, SEED, SPLIT_SEED, QualitySplit, add_hh_rlhf_option, build_pairs,
                        hh_rlhf_file, load_dataset, ours_data_report, quality_split, read_jsonl, smollm2_path,
                        write_records)

PYTHON = sys.executable
# What estimate / gpu_check give every run: no evaluation, no saving, no progress bar.
QUIET = ["train.eval_interval=0", "train.eval_before_training=false", "train.save_interval=0",
         "logging.progress_bar=false"]


# ---------------------------------------------------------------------------
# Environment, precision, threads
# ---------------------------------------------------------------------------


def default_precision() -> str:
    """Both sides' precision unless --precision says otherwise: bf16 where this machine runs bf16 matmuls fast,
    else fp32 (recipes' train.precision auto; on a CPU without oneDNN bf16 kernels bf16 is ~45x slower)."""
    from alignment.core.precision import resolve_precision

    return resolve_precision("auto")[0]


def ours_precision(requested: str) -> str:
    """Our train.precision for the precision both sides run: TRL's bf16 is autocast over fp32 weights and
    optimizer, which is our bf16-mixed (our plain bf16 keeps bf16 weights: another setting, docs/experiments.md)."""
    from alignment.core.precision import resolve_precision

    resolved = resolve_precision(requested)[0]
    return "bf16-mixed" if resolved == "bf16" else resolved


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


def side_env(threads: int, extra: dict | None = None) -> dict:
    """The environment of every side's process: bench_env plus the same CPU thread count.

    threads=1 (the default of the sft, rm and dpo benchmarks): on a small machine shared with other jobs
    (2 cores here), a process with one OpenMP thread per core stalls at every parallel op whenever a
    neighbour takes a core, since every parallel op waits for its slowest thread (bench.sft found steps
    3-10x slower and erratic, 20-60 s instead of ~6 s, with a ratio that said more about the neighbours
    than about the trainers); one thread per side keeps steps steady. threads=0 leaves torch's default
    (all cores), the better choice on an idle machine.
    """
    env = dict(extra or {})
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return bench_env(env)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def load_note() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unavailable"


# ---------------------------------------------------------------------------
# Running a side: logs, timeouts, peak memory, work directories
# ---------------------------------------------------------------------------

PEAK_MIB: dict[str, float] = {}  # label -> peak PSS of that side's whole process tree (MiB)


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


@contextmanager
def bench_workdir(keep: str | None, prefix: str):
    """The benchmark's work directory: `keep` (--workdir) if given, kept; else a temporary one, removed at the end."""
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield workdir
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def private_cache(workdir: Path) -> Path:
    """An ALIGN_CACHE that shares the built models with the real cache but has no cached reference log-probs.

    Our precomputed reference is cached on disk by content; a benchmark must time the
    one-off computation, never a cache hit from an earlier run, and must not delete
    entries other runs may be using. So every cache entry is linked, except ref_logps/.
    """
    from alignment.core.models import cache_dir

    smollm2_path()  # build the model once in the real cache first
    real = cache_dir()
    private = workdir / "align-cache"
    private.mkdir(parents=True, exist_ok=True)
    for entry in real.iterdir():
        if entry.name == "ref_logps" or entry.name.startswith("."):
            continue
        link = private / entry.name
        if not link.exists():
            os.symlink(entry.resolve(), link)
    return private


# ---------------------------------------------------------------------------
# Workers: `python -m bench.NAME --worker KIND SPEC.json`
# ---------------------------------------------------------------------------


def add_worker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), default=None, help=argparse.SUPPRESS)


def serve_worker(worker: list[str], workers: dict[str, Callable[[dict], None]]) -> int:
    """Worker mode: run workers[KIND] on the spec (--worker KIND SPEC.json)."""
    kind, spec_path = worker
    workers[kind](json.loads(Path(spec_path).read_text()))
    return 0


def run_worker(module: str, kind: str, spec: dict, workdir: Path, label: str, env: dict | None = None,
               python: str = PYTHON, launcher: list[str] | None = None):
    """Run `python [LAUNCHER] -m MODULE --worker KIND <label>_spec.json` as a side; returns what it wrote to
    spec["result"] (<label>_result.json)."""
    spec = dict(spec, result=str(workdir / f"{label}_result.json"))
    spec_path = workdir / f"{label}_spec.json"
    spec_path.write_text(json.dumps(spec))
    run_logged([python, *(launcher or []), "-m", module, "--worker", kind, str(spec_path)], workdir / f"{label}.log",
               label, env=env)
    return json.loads(Path(spec["result"]).read_text())


def write_result(spec: dict, result) -> None:
    """A worker's answer, in the file run_worker reads."""
    Path(spec["result"]).write_text(json.dumps(result))


def timed(fn, key: str, timing: dict):
    """`fn`, adding the wall seconds of every call to timing[key] (for one-off work inside a side)."""

    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - start

    return wrapper


# ---------------------------------------------------------------------------
# Our side: the CLI, directly or in a wrapper that reads CPU time per step
# ---------------------------------------------------------------------------


def cli_command(command: list[str], sets) -> list[str]:
    """`python -m alignment.cli COMMAND... --set KEY=VALUE ...` (sets: a dict, or KEY=VALUE strings)."""
    items = [f"{key}={value}" for key, value in sets.items()] if isinstance(sets, dict) else list(sets)
    cmd = [PYTHON, "-m", "alignment.cli", *command]
    for item in items:
        cmd += ["--set", item]
    return cmd


def run_stage(stage: str, recipe: str, sets, workdir: Path, label: str, env: dict | None = None,
              timeout: float | None = None) -> float:
    """Our stage as a user runs it (`align STAGE RECIPE --set ...`), logged to workdir/<label>.log; its wall time."""
    return run_logged(cli_command([stage, recipe], sets), workdir / f"{label}.log", label, env=env, timeout=timeout)


def ours_sets(out: Path, train: str, *, max_rows, max_length: int, global_batch: int, micro_batch: int, lr: float,
              precision: str, scheduler: str = "cosine", warmup_steps: int = 2, extra: dict | None = None) -> dict:
    """The recipe overrides every comparison gives our stage: the model, the rows, the batch, AdamW and its
    schedule, full fine-tune, no gradient checkpointing, no eval/saving/trackers; `extra` adds or replaces."""
    sets = {
        "output_dir": str(out),
        "seed": SEED,
        "model.name_or_path": "smollm2-135m",
        "model.gradient_checkpointing": "false",
        "data.train": train,
        "data.eval": "null",
        "data.max_rows": max_rows,
        "data.max_length": max_length,
        "train.global_batch_size": global_batch,
        "train.micro_batch_size": micro_batch,
        "train.learning_rate": lr,
        "train.lr_scheduler": scheduler,
        "train.warmup_steps": warmup_steps,
        "train.weight_decay": 0.0,
        "train.max_grad_norm": 1.0,
        "train.precision": precision,
        "train.eval_interval": 0,
        "train.save_interval": 0,
        "lora.enabled": "false",
        "logging.wandb": "disabled",
    }
    sets.update(extra or {})
    return sets


def run_cli_worker(spec: dict, install=None) -> None:
    """Worker process for our side: `alignment.cli.main(argv)`, as `python -m alignment.cli ...` runs it.

    The only addition: each lap of the stage's Clock (the step wall time it logs) also
    records the process CPU time over the same interval. `install(timing)` may wrap more
    functions to time one-off work into the `timing` dict, written out with the laps.
    """
    from alignment import cli
    from alignment.core import loop

    timing: dict = {"wall": [], "cpu": []}
    original_init, original_lap = loop.Clock.__init__, loop.Clock.lap

    def init(self):
        original_init(self)
        self.last_cpu = time.process_time()

    def lap(self, name=None):
        now_cpu = time.process_time()
        elapsed = original_lap(self, name)
        if name is None:  # an optimizer step's lap (named laps are an RL iteration's phases)
            timing["wall"].append(elapsed)
            timing["cpu"].append(now_cpu - self.last_cpu)
        self.last_cpu = now_cpu
        return elapsed

    loop.Clock.__init__, loop.Clock.lap = init, lap
    if install is not None:
        install(timing)
    code = cli.main(spec["argv"])
    write_result(spec, timing)
    sys.exit(code)


def run_ours_worker(module: str, stage: str, recipe: str, sets: dict, workdir: Path, label: str,
                    global_batch: int, env: dict) -> StepLog:
    """Our stage through `-m MODULE --worker ours` (run_cli_worker): per-step log from metrics.jsonl + its laps."""
    cli_cmd = cli_command([stage, recipe], sets)
    print(f"[{label}] runs, in a wrapper that also reads process CPU time per step: {' '.join(cli_cmd)}", flush=True)
    worker = run_worker(module, "ours", {"argv": cli_cmd[3:]}, workdir, label, env)
    return pair_log_from_metrics(Path(sets["output_dir"]) / "metrics.jsonl", global_batch, worker)


# ---------------------------------------------------------------------------
# Per-step logs and throughput
# ---------------------------------------------------------------------------


@dataclass
class StepLog:
    """Per optimizer step of one side: wall seconds, process CPU seconds (where read), non-padding input tokens,
    supervised targets (SFT), pairs (preference stages); losses where known (ours: per step; TRL: (step, mean
    since its last log)); one-off timings in `extra`."""

    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    pairs: list[float] = field(default_factory=list)
    losses: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, seconds: float, tokens: float, targets: float = 0.0, pairs: float = 0.0, cpu: float = 0.0) -> None:
        self.seconds.append(float(seconds))
        self.tokens.append(float(tokens))
        self.targets.append(float(targets))
        self.pairs.append(float(pairs))
        self.cpu.append(float(cpu))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StepLog":
        return cls(**data)


def sft_log_from_metrics(metrics_path: Path) -> StepLog:
    """Per-step tokens/targets/seconds from one of our runs' metrics.jsonl (train/tokens, train/tokens_per_s)."""
    log = StepLog()
    for record in read_jsonl(metrics_path):
        if "train/tokens" not in record:
            continue
        log.losses.append(record.get("loss"))
        tokens = record["train/tokens"]
        rate = record["train/tokens_per_s"]
        log.add(tokens / rate if rate else 0.0, tokens, record.get("train/targets", 0.0))
    return log


def pair_log_from_metrics(metrics_path: Path, global_batch: int, worker: dict) -> StepLog:
    """Per-step pairs/tokens/wall seconds from one of our preference runs' metrics.jsonl, CPU from its wrapper.

    The stages log train/pairs_per_s = pairs / step wall time and train/tokens_per_s =
    non-padding tokens / the same time; every step of a benchmark run holds global_batch pairs.
    """
    records = [r for r in read_jsonl(metrics_path) if "train/pairs_per_s" in r]
    if len(records) != len(worker["cpu"]):
        raise RuntimeError(f"{metrics_path}: {len(records)} steps logged, {len(worker['cpu'])} timer laps")
    log = StepLog(extra={k: v for k, v in worker.items() if k not in ("cpu", "wall")})
    for record, cpu, wall in zip(records, worker["cpu"], worker["wall"]):
        seconds = global_batch / record["train/pairs_per_s"]
        if abs(seconds - wall) > 1e-3 * max(wall, 1.0):
            raise RuntimeError(f"{metrics_path}: step {record['step']}: logged {seconds:.4f}s, timer lap {wall:.4f}s")
        log.add(seconds, round(record["train/tokens_per_s"] * seconds), pairs=global_batch, cpu=cpu)
    return log


@dataclass
class Row:
    """One side's steps, the first `warmup` not timed."""

    name: str
    log: StepLog
    warmup: int
    note: str = ""

    def __post_init__(self):
        if len(self.log.seconds) <= self.warmup:
            raise ValueError(f"{self.name}: only {len(self.log.seconds)} steps logged, need more than the "
                             f"{self.warmup} warm-up steps")

    def timed(self, field: str) -> float:
        """The sum of one of the log's per-step lists over the timed steps."""
        return sum(getattr(self.log, field)[self.warmup:])

    def total(self, field: str) -> float:
        """The sum over every step, warm-up included."""
        return sum(getattr(self.log, field))

    @property
    def steps(self) -> int:  # timed steps
        return len(self.log.seconds) - self.warmup

    @property
    def seconds_per_step(self) -> float:
        return self.timed("seconds") / max(self.steps, 1)

    @property
    def token_rate(self) -> float:
        return self.timed("tokens") / max(self.timed("seconds"), 1e-12)

    @property
    def pair_rate(self) -> float:
        return self.timed("pairs") / max(self.timed("seconds"), 1e-12)

    @property
    def cpu_rate(self) -> float:
        """Pairs per process CPU-second over the timed steps."""
        return self.timed("pairs") / max(self.timed("cpu"), 1e-12)

    @property
    def one_off(self) -> str:
        seconds = self.log.extra.get("ref_precompute_s")
        return "-" if seconds is None else f"{seconds:.1f}s"


@dataclass
class Settings:
    """What both sides of a speed comparison share."""

    steps: int  # optimizer steps in all (warm-up + timed)
    warmup: int
    global_batch: int
    micro_batch: int
    max_length: int
    max_prompt_length: int
    precision: str

    @classmethod
    def from_args(cls, args) -> "Settings":
        """From a speed benchmark's options (add_speed_options); resolves --precision."""
        resolve_precision(args)
        if args.global_batch % args.micro_batch:
            raise SystemExit("--global-batch must be a multiple of --micro-batch")
        return cls(steps=args.warmup_steps + args.timed_steps, warmup=args.warmup_steps,
                   global_batch=args.global_batch, micro_batch=args.micro_batch, max_length=args.max_length,
                   max_prompt_length=getattr(args, "max_prompt_length", None) or args.max_length // 2,
                   precision=args.precision)

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.micro_batch

    def describe(self, lr: float) -> str:
        return (f"max_length {self.max_length}, global batch {self.global_batch} (micro {self.micro_batch}), "
                f"{self.steps} steps ({self.warmup} warm-up + {self.steps - self.warmup} timed), AdamW lr {lr:g}")

    def build_pairs(self, source: str, reward_model: bool = False):
        """bench.data.build_pairs for these steps, batches and lengths."""
        return build_pairs(source, self.steps, self.global_batch, self.micro_batch, self.max_length,
                           self.max_prompt_length, reward_model)

    def ours_sets(self, train: str, max_rows: int, out: Path, lr: float, extra: dict) -> dict:
        """ours_sets for these steps and batches, a log line per step."""
        return ours_sets(out, train, max_rows=max_rows, max_length=self.max_length, global_batch=self.global_batch,
                         micro_batch=self.micro_batch, lr=lr, precision=self.precision,
                         extra={"train.max_steps": self.steps, "train.log_interval": 1, **extra})

    def pair_sets(self, data, out: Path, lr: float) -> dict:
        """Our recipe overrides shared by the RM and DPO speed benchmarks (on `data`: bench.data.PairData)."""
        return self.ours_sets(data.source, data.max_rows, out, lr, {
            "data.eval_fraction": 0.0, "data.max_eval_rows": 0, "train.eval_before_training": "false",
            "logging.progress_bar": "false"})

    def trl_args(self, output_dir: str, lr: float) -> dict:
        """TrainingArguments every TRL trainer of a speed comparison gets: our batch, schedule, optimizer,
        precision and step count, the rows in our sampler's order."""
        return trl_args(output_dir, self.precision, self.max_length, self.micro_batch, self.accumulation, lr,
                        max_steps=self.steps, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.0,
                        max_grad_norm=1.0, train_sampling_strategy="sequential", dataloader_num_workers=0)


def run_pair_benchmark(args, s: Settings, name: str, header: str, what: str, sides, results,
                       reward_model: bool = False) -> int:
    """The rm and dpo speed benchmarks' frame: in the work directory, the pairs (bench.data.build_pairs), `header`
    and the data, `sides(data, workdir)` -> rows, their table (`what`, pairs/s), the check that every side did the
    same work, and `results(rows by name)` when both sides ran."""
    started = time.perf_counter()
    with bench_workdir(args.workdir, f"bench-{name}-") as workdir:
        data = s.build_pairs(hh_rlhf_file(args.hh_rlhf), reward_model)
        print(f"{header}; torch threads per side {args.threads or torch_threads()}; {load_note()}", flush=True)
        print(data.describe(), flush=True)
        rows = sides(data, workdir)
        print_pairs_table(f"{what}, pairs/s ({load_note()} at the end)", rows, s.warmup)
        check_same_work(rows, data, s.steps)
        print(f"all sides processed the same {len(data.pairs)} pairs / {data.tokens} tokens in the same batches; "
              f"benchmark wall time {time.perf_counter() - started:.0f}s")
        if args.only is None:
            results({r.name: r for r in rows})
    return 0


def check_same_work(rows: list[Row], data, steps: int) -> None:
    """Every side ran `steps` steps over exactly the benchmark's pairs and tokens (data: bench.data.PairData)."""
    for r in rows:
        if len(r.log.seconds) != steps:
            raise RuntimeError(f"{r.name}: {len(r.log.seconds)} steps timed, expected {steps}")
        if sum(r.log.pairs) != len(data.pairs) or abs(sum(r.log.tokens) - data.tokens) > 0.5:
            raise RuntimeError(f"{r.name}: processed {sum(r.log.pairs):.0f} pairs / {sum(r.log.tokens):.0f} tokens, "
                               f"expected {len(data.pairs)} / {data.tokens}")


# ---------------------------------------------------------------------------
# TRL's side: step clock, counting collator
# ---------------------------------------------------------------------------


def trl_args(output_dir: str, precision: str, max_length: int, micro_batch: int, accumulation: int, lr: float,
             seed: int = SEED, **more) -> dict:
    """TrainingArguments both TRL sides of every comparison get (more: the comparison's own)."""
    import torch

    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=lr,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 without a GPU otherwise
        max_length=max_length,
        gradient_checkpointing=False,  # ours does not checkpoint activations either (TRL's default is True)
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        **more,
    )


def step_clock():
    """A transformers TrainerCallback timing every optimizer step (wall and process CPU), like our Clock.

    A step runs from the previous step's `on_step_end` (or `on_train_begin`, or `start()`) to its own
    `on_step_end`, so it includes fetching/collating the batch and the trainer's logging. `losses`:
    (step, mean train loss since the previous log).
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last = self.last_cpu = None
            self.seconds: list[float] = []
            self.cpu: list[float] = []
            self.losses: list[tuple[int, float]] = []

        def start(self):
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_train_begin(self, args, state, control, **kwargs):
            self.start()

        def on_step_end(self, args, state, control, **kwargs):
            now, now_cpu = time.perf_counter(), time.process_time()
            self.seconds.append(now - self.last)
            self.cpu.append(now_cpu - self.last_cpu)
            self.last, self.last_cpu = now, now_cpu

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))

    return StepClock()


class CountingCollator:
    """Wraps a trainer's data collator to count, per micro-batch, examples (pairs, for a preference collator),
    non-padding input tokens and, with targets=True, supervised targets (labels other than -100 after the first
    position). Costs one or two reductions over a [B, T] integer tensor per batch; the output is unchanged."""

    def __init__(self, inner, targets: bool = False):
        self.inner = inner
        self.count_targets = targets
        self.pairs: list[float] = []
        self.tokens: list[float] = []
        self.targets: list[float] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.pairs.append(float(len(examples)))
        self.tokens.append(float(batch["attention_mask"].sum()))
        if self.count_targets:
            self.targets.append(float((batch["labels"][:, 1:] != -100).sum()))
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_trl_counted(trainer_class, config, data: str, accumulation: int, describe, targets: bool = False, **kwargs):
    """TRL's side of a speed comparison: `trainer_class` on the smollm2 model and the records in `data`, with the step
    clock and the counting collator; prints the torch threads, optimizer and precision, then describe(trainer,
    trainable parameters); trains. Returns the trainer and its per-step log (trainable_params in extra)."""
    import torch

    clock = step_clock()
    trainer = trainer_class(model=smollm2_path(), args=config, train_dataset=load_dataset(data), callbacks=[clock],
                            **kwargs)
    counter = CountingCollator(trainer.data_collator, targets)
    trainer.data_collator = counter
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"torch threads {torch.get_num_threads()}, optimizer {config.optim}, bf16 {config.bf16}, "
          f"{describe(trainer, trainable)}", flush=True)
    trainer.train()
    log = trl_log(counter, clock, accumulation)
    log.extra["trainable_params"] = trainable
    return trainer, log


def trl_log(counter: CountingCollator, clock, accumulation: int) -> StepLog:
    """Per-step log of a TRL run from the counting collator and the step clock."""
    n = len(clock.seconds)
    if len(counter.tokens) != n * accumulation:
        raise RuntimeError(f"{len(counter.tokens)} batches collated for {n} steps x {accumulation} micro-batches")
    log = StepLog(losses=list(clock.losses))
    for step in range(n):
        part = slice(step * accumulation, (step + 1) * accumulation)
        log.add(clock.seconds[step], sum(counter.tokens[part]), sum(counter.targets[part]), sum(counter.pairs[part]),
                clock.cpu[step])
    return log


# ---------------------------------------------------------------------------
# Tables and RESULT lines
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    title: str
    width: str  # alignment and width, e.g. ">11"
    kind: str  # the value's format type and precision, e.g. "d", ".2f", "" for text
    value: Callable[[Row], object]


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    footnote: str  # after "(first N steps of each side are warm-up, not timed; "
    cpu: bool = False  # per-step CPU seconds after the wall seconds
    notes: bool = False  # a last column, each row's note under "setting"


TOKENS_TABLE = Table(
    (Column("side", "<10", "", lambda r: r.name), Column("timed steps", ">11", "d", lambda r: r.steps),
     Column("tokens", ">9", ".0f", lambda r: r.timed("tokens")),
     Column("seconds", ">9", ".2f", lambda r: r.timed("seconds")),
     Column("tokens/s", ">10", ".1f", lambda r: r.token_rate),
     Column("s/step", ">8", ".3f", lambda r: r.seconds_per_step),
     Column("all steps", ">9", "d", lambda r: len(r.log.seconds)),
     Column("all tokens", ">10", ".0f", lambda r: r.total("tokens")),
     Column("supervised", ">10", ".0f", lambda r: r.total("targets"))),
    "'supervised' = next-token targets with loss, all steps")

PAIRS_TABLE = Table(
    (Column("side", "<16", "", lambda r: r.name), Column("timed steps", ">11", "d", lambda r: r.steps),
     Column("pairs", ">6", ".0f", lambda r: r.timed("pairs")),
     Column("seconds", ">8", ".2f", lambda r: r.timed("seconds")),
     Column("pairs/s", ">8", ".3f", lambda r: r.pair_rate), Column("tokens/s", ">9", ".1f", lambda r: r.token_rate),
     Column("s/step", ">7", ".2f", lambda r: r.seconds_per_step),
     Column("CPU s", ">7", ".1f", lambda r: r.timed("cpu")), Column("pairs/CPU-s", ">11", ".4f", lambda r: r.cpu_rate),
     Column("all tok", ">8", ".0f", lambda r: r.total("tokens")), Column("one-off", ">9", "", lambda r: r.one_off)),
    "pairs/s and tokens/s over the timed steps' wall time; tokens = non-padding tokens of chosen + rejected; CPU s "
    "= process CPU time (all threads) of the timed steps; 'one-off' = reference log-prob precompute, not in pairs/s",
    cpu=True, notes=True)


def print_table(rows: list[Row], warmup: int, table: Table = TOKENS_TABLE, title: str | None = None) -> None:
    """One line per side (`table`: which columns), the warm-up note, and every side's per-step seconds."""
    print(f"\n{title}" if title else "")
    notes = ("  setting",) if table.notes else ()
    print(" ".join(f"{c.title:{c.width}}" for c in table.columns) + "".join(notes))
    for r in rows:
        note = f"  {r.note}" if table.notes else ""
        print(" ".join(f"{c.value(r):{c.width}{c.kind}}" for c in table.columns) + note)
    print(f"(first {warmup} steps of each side are warm-up, not timed; {table.footnote})")
    for r in rows:
        cpu = "  | CPU s/step: " + " ".join(f"{x:.2f}" for x in r.log.cpu) if table.cpu else ""
        print(f"  {r.name} s/step: " + " ".join(f"{x:.2f}" for x in r.log.seconds) + cpu)


def print_pairs_table(title: str, rows: list[Row], warmup: int) -> None:
    """The preference benchmarks' table, and what each side's one-off reference precompute took."""
    print_table(rows, warmup, PAIRS_TABLE, title)
    for r in rows:
        e = r.log.extra
        if "ref_precompute_s" in e:
            rest = e["ref_precompute_s"] - e.get("ref_hash_s", 0.0) - e.get("ref_pass_s", 0.0)
            print(f"  {r.name} one-off reference precompute {e['ref_precompute_s']:.1f}s: weights hash "
                  f"{e.get('ref_hash_s', 0.0):.1f}s, forward pass over the {sum(r.log.pairs):.0f} "
                  f"pairs {e.get('ref_pass_s', 0.0):.1f}s, other (reference model load, cache write) {rest:.1f}s")


def print_cpu_check(ours: Row, peer: Row) -> None:
    print(f"cross-check on CPU time ({ours.name} vs {peer.name}): {ours.cpu_rate:.4f} vs {peer.cpu_rate:.4f} "
          f"pairs/CPU-s = {ours.cpu_rate / peer.cpu_rate:.3f}x (wall: {ours.pair_rate / peer.pair_rate:.3f}x)")


def result_line(name: str, ours: float, peer: float, unit: str, digits: int = 2) -> str:
    ratio = ours / peer if peer > 0 else float("inf")
    line = f"RESULT name={name} ours={ours:.{digits}f} peer={peer:.{digits}f} unit={unit} ratio={ratio:.3f}"
    print(line, flush=True)
    return line


def memory_line(name: str, ours_label: str, peer_label: str) -> str:
    """RESULT name=<name>-peak-memory: peak PSS of our side against the peer's (lower is better; goal <= 0.8)."""
    return result_line(f"{name}-peak-memory", PEAK_MIB[ours_label], PEAK_MIB[peer_label], "MiB")


# ---------------------------------------------------------------------------
# Options the benchmarks share
# ---------------------------------------------------------------------------


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: `python -m MODULE`, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def add_precision_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=default,
                        help="both sides" + ("" if default else "; default bf16 where this machine runs bf16 "
                                             "matmuls fast, else fp32 (recipes' train.precision auto)"))


def resolve_precision(args) -> None:
    args.precision = args.precision or default_precision()


def add_workdir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary directory, removed)")


def add_only_option(parser: argparse.ArgumentParser, what: str = "run one side only (no RESULT line)") -> None:
    parser.add_argument("--only", choices=["ours", "trl"], default=None, help=what)


def add_speed_options(parser: argparse.ArgumentParser, timed_steps: int, micro_batch: int, max_length: int,
                      max_length_help: str | None = None, timed_help: str = "", prompt_length: bool = False) -> None:
    """The options of the sft, rm and dpo speed benchmarks: steps, batch, lengths, precision, ZeRO, threads."""
    parser.add_argument("--timed-steps", type=int, default=timed_steps,
                        help="optimizer steps timed on each side" + timed_help)
    parser.add_argument("--warmup-steps", type=int, default=2, help="optimizer steps run first and not timed")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=micro_batch)
    parser.add_argument("--max-length", type=int, default=max_length, help=max_length_help)
    if prompt_length:
        parser.add_argument("--max-prompt-length", type=int, default=None, help="default: half of --max-length")
    add_precision_option(parser)
    parser.add_argument("--zero-stage", type=int, default=None,
                        help="our DeepSpeed ZeRO stage (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per side (OMP_NUM_THREADS), the "
                        "same on both; 0 = torch's default (all cores). Default 1: see bench.harness.side_env")


def add_quality_options(parser: argparse.ArgumentParser, learning_rate: float) -> None:
    """The options of the quality benchmarks (TRL's defaults where a user leaves a setting unset)."""
    parser.add_argument("--train-rows", type=int, default=512, help="first N rows of the training part (both sides)")
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (TRL default 8)")
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    add_precision_option(parser, "bf16")
    parser.add_argument("--max-held-out", type=int, default=None,
                        help="score only the first N held-out pairs (quick runs)")
    add_only_option(parser, "train and score one side (no RESULT)")
    add_workdir_option(parser)
    parser.add_argument("--recipe", default=None, help="instead: train with this recipe as it is (its data must "
                        "hold out the same rows: data.eval_fraction 0.2, seed 0) and score its export the plain way")
    add_hh_rlhf_option(parser)
    add_worker_option(parser)


# ---------------------------------------------------------------------------
# Quality: both sides trained at TRL's settings, both exports scored the plain way
# ---------------------------------------------------------------------------


def run_quality_ours(args, stage: str, recipe: str, split: QualitySplit, workdir: Path, extra: dict) -> Path:
    """Our stage on the split's training rows at the quality benchmarks' settings; its export."""
    out = workdir / "ours"
    sets = ours_sets(out, split.source, max_rows=args.train_rows, max_length=args.max_length, global_batch=args.batch,
                     micro_batch=args.batch, lr=args.learning_rate, precision=args.precision, scheduler="linear",
                     warmup_steps=0, extra={
                         "seed": SPLIT_SEED, "model.export_dtype": "fp32", "data.eval_fraction": HELD_FRACTION,
                         "data.max_eval_rows": 0, "train.num_epochs": args.epochs, "train.max_steps": "null",
                         "train.warmup_ratio": 0.0, "train.eval_before_training": "false",
                         "logging.progress_bar": "false", **extra})
    run_stage(stage, recipe, sets, workdir, "ours")
    return out / "final"


def run_quality_trl(module: str, args, workdir: Path, records: Path, **more) -> tuple[Path, dict]:
    """TRL's trainer on the split's pairs (`module`'s trl worker); its export and what it kept."""
    spec = {"data": str(records), "output_dir": str(workdir / "trl"), "epochs": args.epochs, "batch": args.batch,
            "learning_rate": args.learning_rate, "max_length": args.max_length, "precision": args.precision, **more}
    return workdir / "trl" / "final", run_worker(module, "trl", spec, workdir, "trl")


def trl_quality_args(spec: dict) -> dict:
    """A quality worker's TrainingArguments: the spec's, TRL's defaults otherwise, a loss log every 10 steps."""
    return trl_args(spec["output_dir"], spec["precision"], spec["max_length"], spec["batch"], 1,
                    spec["learning_rate"], seed=SPLIT_SEED, num_train_epochs=spec["epochs"], logging_steps=10)


def save_export(trainer, tokenizer, spec: dict, result: dict) -> None:
    """A quality worker's end: the trained model and tokenizer in output_dir/final, `result` for run_worker."""
    final = Path(spec["output_dir"]) / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    write_result(spec, result)


def ours_kept(split: QualitySplit, max_length: int, reward_model: bool) -> dict:
    report = ours_data_report(split.train_rows, split.source, max_length, None, reward_model)
    report["note"] = "over-long pairs kept: prompt keeps its last tokens, responses cut"
    return report


def trl_kept(split: QualitySplit, counts: dict, what: str) -> dict:
    """TRL's row of the data table: `what` it did with the pairs it did not keep."""
    rows = len(split.train_rows)
    return {"rows": rows, "kept": counts["kept"], "truncated": counts.get("truncated", 0),
            "dropped": rows - counts["kept"],
            "note": f"{sum(split.rejected.values())} rows our parser rejected were never given to it; "
                    f"{counts['given'] - counts['kept']} {what}"}


def _conversation_ids(tokenizer, messages: list, add_generation_prompt: bool = False) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(enc["input_ids"])


def plain_reward_accuracy(model_dir: str, pairs: list, label: str) -> dict:
    """Held-out accuracy of a reward model loaded and scored with transformers alone (see the header)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    margins, started = [], time.perf_counter()
    with torch.no_grad():
        for pair in pairs:
            r = [model(input_ids=torch.tensor([_conversation_ids(tokenizer, pair.prompt + side)])).logits[0, 0].item()
                 for side in (pair.chosen, pair.rejected)]
            margins.append(r[0] - r[1])
    return _accuracy(margins, label, started)


def response_logps(model_dir: str, pairs: list) -> list[tuple[float, float]]:
    """Summed log p(chosen | prompt), log p(rejected | prompt) of a causal LM, transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            prompt = _conversation_ids(tokenizer, pair.prompt, add_generation_prompt=True)
            values = []
            for side in (pair.chosen, pair.rejected):
                full = _conversation_ids(tokenizer, pair.prompt + side)
                if full[: len(prompt)] != prompt:
                    raise RuntimeError(f"{pair.origin}: the chat template does not render the prompt as a prefix")
                ids = torch.tensor([full])
                logits = model(input_ids=ids).logits[0, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
                values.append(logp[len(prompt) - 1 :].sum().item())
            out.append((values[0], values[1]))
    return out


def start_logps(workdir: Path, held: list) -> list:
    """The starting model's response_logps on the held-out pairs, cached in workdir (the same for every run)."""
    cached = workdir / f"start_logps_{len(held)}.json"
    start = json.loads(cached.read_text()) if cached.exists() else response_logps(smollm2_path(), held)
    cached.write_text(json.dumps(start))
    return start


def implicit_reward_accuracy(policy: list[tuple[float, float]], start: list[tuple[float, float]], label: str,
                             started: float) -> dict:
    margins = [(pc - sc) - (pr - sr) for (pc, pr), (sc, sr) in zip(policy, start)]
    return _accuracy(margins, label, started)


def policy_accuracy(model_dir: str, held: list, start: list, label: str) -> dict:
    """Held-out implicit-reward accuracy of a DPO export against the starting model's log-probs."""
    started = time.perf_counter()
    return implicit_reward_accuracy(response_logps(model_dir, held), start, label, started)


def _accuracy(margins: list[float], label: str, started: float) -> dict:
    if any(not math.isfinite(m) for m in margins):
        raise RuntimeError(f"{label}: non-finite scores on the held-out pairs")
    correct = sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
    n = len(margins)
    acc = correct / n
    stderr = math.sqrt(acc * (1 - acc) / n)
    result = {"accuracy": acc, "stderr": stderr, "pairs": n, "mean_margin": sum(margins) / n,
              "seconds": time.perf_counter() - started,
              "correct": [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]}  # per pair, for paired_difference
    print(f"[{label}] held-out accuracy {acc:.4f} (+-{stderr:.3f} s.e.) on {n} pairs, mean margin "
          f"{result['mean_margin']:.4f}, scored in {result['seconds']:.0f}s", flush=True)
    return result


def paired_difference(ours: dict, peer: dict, labels: tuple[str, str] = ("ours", "trl")) -> dict:
    """Accuracy of `ours` minus `peer` (results of _accuracy) on the same held-out pairs, paired: the mean of the
    per-pair differences of correctness (1, 1/2 for a tie, 0) and its standard error (sample standard deviation /
    sqrt(n)); far smaller than the two accuracies' own errors when both sides get most pairs the same way."""
    a, b = ours["correct"], peer["correct"]
    if len(a) != len(b):
        raise ValueError(f"paired difference over different pairs: {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    stderr = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    result = {"difference": mean, "stderr": stderr, "pairs": n, "only_ours": sum(x > 0 for x in d),
              "only_peer": sum(x < 0 for x in d)}
    print(f"[paired] accuracy {labels[0]} - {labels[1]} = {mean:+.4f} (+-{stderr:.4f} s.e., paired over {n} pairs; "
          f"{result['only_ours']} pairs better for {labels[0]}, {result['only_peer']} for {labels[1]}, "
          f"the rest the same)", flush=True)
    return result


def print_data_table(rows: list[tuple[str, dict]]) -> None:
    print(f"\n{'side':<6} {'rows':>5} {'kept':>5} {'truncated':>9} {'dropped':>7}  notes")
    for name, d in rows:
        print(f"{name:<6} {d['rows']:>5} {d['kept']:>5} {d['truncated']:>9} {d['dropped']:>7}  {d.get('note', '')}")


def run_quality(args, stage: str, name: str, header: str, compare) -> int:
    """A quality benchmark: in its work directory, either --recipe (score_recipe), or the split (its training pairs
    written as TRL's records, trl_train.jsonl), `compare(split, workdir, records)` -> (data table rows, accuracy per
    side), then the data table, result.json and the RESULT line `name` (when both sides ran)."""
    started = time.perf_counter()
    with bench_workdir(args.workdir, f"bench-{stage}-quality-") as workdir:
        source = hh_rlhf_file(args.hh_rlhf)
        if args.recipe:
            return score_recipe(stage, args.recipe, workdir, source, args.max_held_out, started)
        split = quality_split(source, args.train_rows, args.max_held_out)
        records = workdir / "trl_train.jsonl"
        write_records(split.train_pairs, records)
        print(f"{name}: {header}; {split.describe()}", flush=True)
        table, acc = compare(split, workdir, records)
        print_data_table(table)
        print(f"benchmark wall time {time.perf_counter() - started:.0f}s")
        (workdir / "result.json").write_text(json.dumps({"accuracy": acc, "data": dict(table)}, indent=1))
        if args.only is None:
            result_line(name, acc["ours"]["accuracy"], acc["trl"]["accuracy"], "accuracy", digits=4)
    return 0


def score_recipe(stage: str, recipe: str, workdir: Path, source: str, max_held_out: int | None,
                 started: float) -> int:
    """Train `align STAGE RECIPE` as the recipe says (output into workdir) and score its export on the held-out
    pairs the plain way; the recipe must hold out the quality benchmarks' rows (data.eval_fraction, seed)."""
    from alignment.core.recipes import load_recipe

    r = load_recipe(recipe, stage, [])
    train = Path(r.data.train) if Path(r.data.train).is_absolute() else REPO / r.data.train
    if ((r.data.eval, r.data.eval_fraction, r.seed) != (None, HELD_FRACTION, SPLIT_SEED) or train.resolve()
            != Path(source).resolve()):
        raise SystemExit(f"{recipe}: must train on {source} with data.eval_fraction {HELD_FRACTION} and seed "
                         f"{SPLIT_SEED} so that its held-out rows are this benchmark's")
    out = workdir / "recipe"
    train_wall = run_logged(cli_command([stage, recipe], [f"output_dir={out}", "logging.progress_bar=false"]),
                            workdir / "recipe.log", stage)
    held = quality_split(source, 0, max_held_out).held
    final = out / "final"
    if (final / "merged").is_dir():  # LoRA: the merged export is the plain-transformers model
        final = final / "merged"
    if stage == "rm":
        result = plain_reward_accuracy(str(final), held, recipe)
    else:
        t0 = time.perf_counter()
        start = start_logps(workdir, held)  # as bench.dpo_quality caches it
        result = implicit_reward_accuracy(response_logps(str(final), held), start, recipe, t0)
    print(f"{recipe}: held-out accuracy {result['accuracy']:.4f} on {result['pairs']} pairs (plain scoring); "
          f"training wall time {train_wall / 60:.1f} min; total {(time.perf_counter() - started) / 60:.1f} min")
    (workdir / "recipe_result.json").write_text(json.dumps({"recipe": recipe, "train_wall_s": train_wall, **result}))
    return 0
