"""Helpers shared by the preference benchmarks (bench/rm.py, bench/dpo.py).

Data. Both sides train on the same preference pairs: the first rows of the hh-rlhf
harmless-base file (read in place, never copied), normalised by
``alignment.core.preference.to_pair`` and tokenized by ``alignment.core.preference.load_pairs``
(the very functions our stages call, with the same max_length / max_prompt_length),
so the pair list here is the list our stage builds from ``data.max_rows`` rows. The
batches are our sampler's (``GlobalBatchSampler``, same seed): TRL gets the pairs in
that order with sequential sampling, so every optimizer step of both sides holds
the same pairs, split into the same micro-batches.

Why token ids for TRL and not its conversational prompt/chosen/rejected path: on these
rows TRL's chat-template tokenization gives the same prompt ids as ours but one more
token per response (the "\\n" after the final <|im_end|>), and it treats long pairs
differently (RewardTrainer drops a pair with a sequence over max_length; DPOTrainer cuts
each sequence's end, prompt first), where ours keeps the prompt's last
max_prompt_length tokens and cuts the responses. At a max_length this CPU can afford,
most hh-rlhf pairs are long, so the two paths would train on different pairs. TRL is
therefore handed our token ids (RewardTrainer: its documented processed-dataset columns
chosen_ids/rejected_ids; DPOTrainer: prompt_ids/chosen_ids/rejected_ids, the columns its
own collator consumes). Tokenization is setup on both sides, outside the timed steps.

Timing. A step's wall time runs from the end of the previous optimizer step to the end
of this one, on both sides (ours: the stage's own Clock, read back from metrics.jsonl
as pairs / train/pairs_per_s; TRL: a TrainerCallback, `step_clock`). The first `warmup`
steps of each side are not timed. Each step's process CPU time (all threads, user +
system) is recorded over the same interval (ours: the Clock's laps, seen by running
`alignment.cli.main` in a thin wrapper process, `run_cli_worker`; TRL: the same callback).
pairs/s over wall time is the result; pairs per CPU-second is printed as a cross-check
that other jobs on a shared machine distort much less than wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_path()

DATA = str(common.REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "harmless-base-test.jsonl")
SEED = 0


@dataclass
class Settings:
    """What both sides of a comparison share."""

    steps: int  # optimizer steps in all (warm-up + timed)
    warmup: int
    global_batch: int
    micro_batch: int
    max_length: int
    max_prompt_length: int
    precision: str

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.micro_batch

    @property
    def pairs(self) -> int:
        return self.steps * self.global_batch


class _Layout:  # what GlobalBatchSampler reads of a BatchLayout (one rank)
    def __init__(self, s: Settings):
        self.global_batch_size = s.global_batch
        self.micro_batch_size = s.micro_batch
        self.world_size = 1
        self.grad_accum_steps = s.accumulation


@dataclass
class PairData:
    max_rows: int  # data.max_rows for our stage: its first max_rows rows give exactly `pairs` pairs
    pairs: list  # TokenizedPair, in file order (our stage's train_pairs)
    order: list[int]  # pair indices in training order: step k = order[k*G:(k+1)*G], micro-batches in turn
    tokens: int  # non-padding tokens over every step (chosen + rejected sequences)
    truncated: int  # pairs cut to max_length (identically for both sides: same ids)
    dropped: dict  # rows our loader rejected (empty response, ...), counted in max_rows
    padded_tokens: int  # tokens incl. padding with right-padded [2B, T] micro-batches (both sides' padded layout)
    packed_tokens: int  # tokens incl. padding with our packed micro-batches (rows of max_length)
    seq_len_mean: float
    seq_len_max: int
    pad_id: int = 0
    sets: dict = field(default_factory=dict)


def build_pairs(s: Settings, reward_model: bool = False) -> PairData:
    """The pairs our stage will train on, and their order, computed with our own loaders (a reward model's
    responses carry the template's suffix: alignment.core.text)."""
    from alignment.core.config import DataConfig
    from alignment.data.report import DataReport
    from alignment.data.sampler import GlobalBatchSampler
    from alignment.data.sources import read_rows
    from alignment.core.models import load_tokenizer
    from alignment.data.layout import collate_pairs
    from alignment.data.preference import load_pairs

    tokenizer = load_tokenizer(common.smollm2_path())
    rows = read_rows(DATA)
    cfg = DataConfig(train=DATA, max_length=s.max_length)
    need = s.pairs
    # Smallest prefix of the file with `need` usable pairs (our stage takes rows[:data.max_rows]).
    n = need
    while True:
        if n > len(rows):
            raise SystemExit(f"{DATA} has too few usable pairs for {need}")
        report = DataReport("train")
        pairs = load_pairs(rows[:n], tokenizer, cfg, s.max_prompt_length, report, reward_model)
        if len(pairs) >= need:
            break
        n += need - len(pairs)
    while len(pairs) > need:  # only if the last rows added more than needed
        n -= 1
        report = DataReport("train")
        pairs = load_pairs(rows[:n], tokenizer, cfg, s.max_prompt_length, report, reward_model)
    assert len(pairs) == need
    sampler = GlobalBatchSampler(len(pairs), _Layout(s), SEED)
    order: list[int] = []
    padded = packed = 0
    for step in range(s.steps):
        for idx in sampler.micro_batches(step, 0):
            order += idx
            chunk = [pairs[i] for i in idx]
            padded += collate_pairs(chunk, tokenizer.pad_token_id)["input_ids"].numel()
            packed += collate_pairs(chunk, tokenizer.pad_token_id, s.max_length)["input_ids"].numel()
    assert sorted(order) == list(range(need)), "one epoch: every pair exactly once"
    lengths = [len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    return PairData(max_rows=n, pairs=pairs, order=order, tokens=sum(lengths), truncated=report.truncated,
                    dropped=dict(report.dropped), padded_tokens=padded, packed_tokens=packed,
                    seq_len_mean=statistics.mean(lengths), seq_len_max=max(lengths), pad_id=tokenizer.pad_token_id)


def write_trl_records(data: PairData, path: Path, kind: str) -> None:
    """TRL's input, one JSON object per pair in training order (RM: full sequences; DPO: prompt + responses)."""
    with open(path, "w") as handle:
        for i in data.order:
            p = data.pairs[i]
            if kind == "rm":
                record = {"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids}
            else:
                record = {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
            handle.write(json.dumps(record) + "\n")


def describe(s: Settings, data: PairData) -> str:
    dropped = ", ".join(f"{v} {k}" for k, v in data.dropped.items()) or "none"
    return (f"data: first {data.max_rows} rows of {DATA} -> {len(data.pairs)} pairs (rows dropped by our loader: "
            f"{dropped}); {data.truncated} pairs truncated to max_length {s.max_length} (prompt keeps its last "
            f"{s.max_prompt_length} tokens; same ids on both sides); {data.tokens} tokens in "
            f"{2 * len(data.pairs)} sequences (mean {data.seq_len_mean:.0f}, max {data.seq_len_max}); "
            f"right-padded micro-batches hold {data.padded_tokens} token slots "
            f"({100 * (1 - data.tokens / data.padded_tokens):.0f}% padding), packed ones {data.packed_tokens} "
            f"({100 * (1 - data.tokens / data.packed_tokens):.0f}% padding)")


# ---------------------------------------------------------------------------
# Per-step logs and throughput
# ---------------------------------------------------------------------------


@dataclass
class PairLog:
    """Per optimizer step: pairs, non-padding tokens, wall seconds, process CPU seconds (+ one-off times)."""

    pairs: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, pairs: float, tokens: float, seconds: float, cpu: float) -> None:
        self.pairs.append(float(pairs))
        self.tokens.append(float(tokens))
        self.seconds.append(float(seconds))
        self.cpu.append(float(cpu))

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "tokens": self.tokens, "seconds": self.seconds, "cpu": self.cpu,
                "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "PairLog":
        return cls(list(d["pairs"]), list(d["tokens"]), list(d["seconds"]), list(d["cpu"]), dict(d.get("extra", {})))


def ours_log(metrics_path: Path, global_batch: int, worker: dict) -> PairLog:
    """Per-step pairs/tokens/wall seconds from one of our preference runs' metrics.jsonl, CPU from its wrapper.

    The stages log train/pairs_per_s = pairs / step wall time and train/tokens_per_s =
    non-padding tokens / the same time; every step of a benchmark run holds global_batch pairs.
    """
    records = [r for r in common.read_jsonl(metrics_path) if "train/pairs_per_s" in r]
    if len(records) != len(worker["cpu"]):
        raise RuntimeError(f"{metrics_path}: {len(records)} steps logged, {len(worker['cpu'])} timer laps")
    log = PairLog(extra={k: v for k, v in worker.items() if k not in ("cpu", "wall")})
    for record, cpu, wall in zip(records, worker["cpu"], worker["wall"]):
        seconds = global_batch / record["train/pairs_per_s"]
        if abs(seconds - wall) > 1e-3 * max(wall, 1.0):
            raise RuntimeError(f"{metrics_path}: step {record['step']}: logged {seconds:.4f}s, timer lap {wall:.4f}s")
        log.add(global_batch, round(record["train/tokens_per_s"] * seconds), seconds, cpu)
    return log


@dataclass
class Row:
    name: str
    note: str
    log: PairLog
    warmup: int

    @property
    def timed(self) -> slice:
        return slice(self.warmup, None)

    @property
    def pairs(self) -> float:
        return sum(self.log.pairs[self.timed])

    @property
    def seconds(self) -> float:
        return sum(self.log.seconds[self.timed])

    @property
    def rate(self) -> float:
        return self.pairs / max(self.seconds, 1e-12)

    @property
    def token_rate(self) -> float:
        return sum(self.log.tokens[self.timed]) / max(self.seconds, 1e-12)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.log.cpu[self.timed])

    @property
    def cpu_rate(self) -> float:
        """Pairs per process CPU-second over the timed steps."""
        return self.pairs / max(self.cpu_seconds, 1e-12)


def print_table(title: str, rows: list[Row], warmup: int) -> None:
    print(f"\n{title}")
    print(f"{'side':<16} {'timed steps':>11} {'pairs':>6} {'seconds':>8} {'pairs/s':>8} {'tokens/s':>9} "
          f"{'s/step':>7} {'CPU s':>7} {'pairs/CPU-s':>11} {'all tok':>8} {'one-off':>9}  setting")
    for r in rows:
        n = len(r.log.seconds) - r.warmup
        one_off = r.log.extra.get("ref_precompute_s")
        one_off = f"{one_off:8.1f}s" if one_off is not None else f"{'-':>9}"
        print(f"{r.name:<16} {n:>11d} {r.pairs:>6.0f} {r.seconds:>8.2f} {r.rate:>8.3f} {r.token_rate:>9.1f} "
              f"{r.seconds / max(n, 1):>7.2f} {r.cpu_seconds:>7.1f} {r.cpu_rate:>11.4f} {sum(r.log.tokens):>8.0f} "
              f"{one_off}  {r.note}")
    print(f"(first {warmup} steps of each side are warm-up, not timed; pairs/s and tokens/s over the timed steps' "
          "wall time; tokens = non-padding tokens of chosen + rejected; CPU s = process CPU time (all threads) of "
          "the timed steps; 'one-off' = reference log-prob precompute, not in pairs/s)")
    for r in rows:
        print(f"  {r.name} s/step: " + " ".join(f"{x:.2f}" for x in r.log.seconds)
              + "  | CPU s/step: " + " ".join(f"{x:.2f}" for x in r.log.cpu))
    for r in rows:
        e = r.log.extra
        if "ref_precompute_s" in e:
            rest = e["ref_precompute_s"] - e.get("ref_hash_s", 0.0) - e.get("ref_pass_s", 0.0)
            print(f"  {r.name} one-off reference precompute {e['ref_precompute_s']:.1f}s: weights hash "
                  f"{e.get('ref_hash_s', 0.0):.1f}s, forward pass over the {sum(r.log.pairs):.0f} "
                  f"pairs {e.get('ref_pass_s', 0.0):.1f}s, other (reference model load, cache write) {rest:.1f}s")


def check_same_work(rows: list[Row], data: PairData, steps: int) -> None:
    """Every side ran `steps` steps over exactly the benchmark's pairs and tokens."""
    for r in rows:
        if len(r.log.seconds) != steps:
            raise RuntimeError(f"{r.name}: {len(r.log.seconds)} steps timed, expected {steps}")
        if sum(r.log.pairs) != len(data.pairs) or abs(sum(r.log.tokens) - data.tokens) > 0.5:
            raise RuntimeError(f"{r.name}: processed {sum(r.log.pairs):.0f} pairs / {sum(r.log.tokens):.0f} tokens, "
                               f"expected {len(data.pairs)} / {data.tokens}")


# ---------------------------------------------------------------------------
# Running the two sides
# ---------------------------------------------------------------------------


def private_cache(workdir: Path) -> Path:
    """An ALIGN_CACHE that shares the built models with the real cache but has no cached reference log-probs.

    Our precomputed reference is cached on disk by content; a benchmark must time the
    one-off computation, never a cache hit from an earlier run, and must not delete
    entries other runs may be using. So every cache entry is linked, except ref_logps/.
    """
    from alignment.core.models import cache_dir

    common.smollm2_path()  # build the model once in the real cache first
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


def ours_command(stage: str, recipe: Path, sets: dict) -> list[str]:
    cmd = [common.PYTHON, "-m", "alignment.cli", stage, str(recipe.relative_to(common.REPO))]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def side_env(threads: int, extra: dict | None = None) -> dict:
    """The environment of every side's process: bench_env plus the same CPU thread count.

    threads=1 (the default of both benchmarks): on a small machine shared with other jobs
    (2 cores here), a process with one OpenMP thread per core stalls at every parallel op
    whenever a neighbour takes a core (bench/sft.py found 3-10x slower, erratic steps); one
    thread per side keeps steps steady. threads=0 leaves torch's default (all cores), the
    better choice on an idle machine.
    """
    env = dict(extra or {})
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return common.bench_env(env)


def run_cli_worker(spec_path: str, install=None) -> None:
    """Worker process for our side: `alignment.cli.main(argv)`, as `python -m alignment.cli ...` runs it.

    The only addition: each lap of the stage's Clock (the step wall time it logs) also
    records the process CPU time over the same interval. `install(timing)` may wrap more
    functions to time one-off work into the `timing` dict, written out with the laps.
    """
    from alignment import cli
    from alignment.core import loop

    spec = json.loads(Path(spec_path).read_text())
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
    Path(spec["result"]).write_text(json.dumps(timing))
    sys.exit(code)


def run_ours(script: str, stage: str, recipe: Path, sets: dict, workdir: Path, label: str, global_batch: int,
             env: dict) -> PairLog:
    """Run our stage through `script --ours-worker` (run_cli_worker); per-step log from metrics.jsonl + laps."""
    cli_cmd = ours_command(stage, recipe, sets)
    spec = {"argv": cli_cmd[3:], "result": str(workdir / f"{label}_timing.json")}
    spec_path = workdir / f"{label}_spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"[{label}] runs, in a wrapper that also reads process CPU time per step: {' '.join(cli_cmd)}", flush=True)
    common.run_logged([common.PYTHON, script, "--ours-worker", str(spec_path)], workdir / f"{label}.log", label,
                      env=env)
    worker = json.loads(Path(spec["result"]).read_text())
    return ours_log(Path(sets["output_dir"]) / "metrics.jsonl", global_batch, worker)


def print_cpu_check(ours: Row, peer: Row) -> None:
    print(f"cross-check on CPU time ({ours.name} vs {peer.name}): {ours.cpu_rate:.4f} vs {peer.cpu_rate:.4f} "
          f"pairs/CPU-s = {ours.cpu_rate / peer.cpu_rate:.3f}x (wall: {ours.rate / peer.rate:.3f}x)")


def common_sets(s: Settings, data: PairData, out: Path, lr: float) -> dict:
    """Our recipe overrides shared by the RM and DPO benchmarks (no eval, no saving, no trackers)."""
    return {
        "output_dir": str(out),
        "seed": SEED,
        "model.name_or_path": "smollm2-135m",
        "model.gradient_checkpointing": "false",
        "data.train": DATA,
        "data.eval": "null",
        "data.eval_fraction": 0.0,
        "data.max_rows": data.max_rows,
        "data.max_eval_rows": 0,
        "data.max_length": s.max_length,
        "train.global_batch_size": s.global_batch,
        "train.micro_batch_size": s.micro_batch,
        "train.max_steps": s.steps,
        "train.learning_rate": lr,
        "train.lr_scheduler": "cosine",
        "train.warmup_steps": 2,
        "train.weight_decay": 0.0,
        "train.max_grad_norm": 1.0,
        "train.precision": s.precision,
        "train.eval_interval": 0,
        "train.eval_before_training": "false",
        "train.save_interval": 0,
        "train.log_interval": 1,
        "lora.enabled": "false",
        "logging.wandb": "disabled",
        "logging.progress_bar": "false",
    }


def trl_common_args(s: Settings, output_dir: str, lr: float) -> dict:
    """TrainingArguments both TRL trainers get: the same batch, schedule, optimizer, precision as ours."""
    import torch

    return dict(
        output_dir=output_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.micro_batch,
        gradient_accumulation_steps=s.accumulation,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=s.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 without a GPU otherwise
        max_length=s.max_length,
        gradient_checkpointing=False,  # ours does not checkpoint activations either (TRL's default is True)
        train_sampling_strategy="sequential",  # the pairs arrive in our sampler's order
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=SEED,
    )


class CountingCollator:
    """Wraps a TRL preference collator to count, per micro-batch, pairs and non-padding tokens."""

    def __init__(self, inner):
        self.inner = inner
        self.pairs: list[float] = []
        self.tokens: list[float] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.pairs.append(float(len(examples)))
        self.tokens.append(float(batch["attention_mask"].sum()))
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def step_clock():
    """A TrainerCallback timing every optimizer step (wall and process CPU), like our Clock.

    A step runs from the previous step's `on_step_end` (or `on_train_begin`) to its own
    `on_step_end`, so it includes fetching/collating the batch and the trainer's logging.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last = self.last_cpu = None
            self.seconds: list[float] = []
            self.cpu: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now, now_cpu = time.perf_counter(), time.process_time()
            self.seconds.append(now - self.last)
            self.cpu.append(now_cpu - self.last_cpu)
            self.last, self.last_cpu = now, now_cpu

    return StepClock()


def trl_log(counter: CountingCollator, clock, accumulation: int) -> PairLog:
    """Per-step pairs/tokens/seconds of a TRL run from the counting collator and the step clock."""
    n = len(clock.seconds)
    if len(counter.pairs) != n * accumulation:
        raise RuntimeError(f"{len(counter.pairs)} batches collated for {n} steps x {accumulation} micro-batches")
    log = PairLog()
    for step in range(n):
        part = slice(step * accumulation, (step + 1) * accumulation)
        log.add(sum(counter.pairs[part]), sum(counter.tokens[part]), clock.seconds[step], clock.cpu[step])
    return log


def load_trl_dataset(path: str):
    from datasets import Dataset

    return Dataset.from_list(common.read_jsonl(Path(path)))


def run_trl_worker(script: str, spec: dict, workdir: Path, label: str, env: dict) -> PairLog:
    """Run `script --trl-worker spec.json` in a subprocess; returns its PairLog."""
    spec = dict(spec, result=str(workdir / f"{label}_result.json"))
    spec_path = workdir / f"{label}_spec.json"
    spec_path.write_text(json.dumps(spec))
    common.run_logged([common.PYTHON, script, "--trl-worker", str(spec_path)], workdir / f"{label}.log", label,
                      env=env)
    return PairLog.from_dict(json.loads(Path(spec["result"]).read_text()))


def cleanup(workdir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


def load_note() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unavailable"
