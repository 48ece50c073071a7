"""Pieces every stage's recipe uses: run setup, the accumulated optimizer step, checkpoints, finish.

A stage keeps its own loop (it reads as the algorithm's steps) and calls these.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from alignment.core import allocator
from alignment.core import checkpoint as ckpt
from alignment.core import manifest
from alignment.core.config import RecipeBase, RecipeError, dump_recipe
from alignment.core.engine import Engine
from alignment.core.lean_layers import make_lean
from alignment.core.models import apply_lora, attention_for
from alignment.core.models import disable_dropout as turn_off_dropout
from alignment.core.models import load_model
from alignment.core.tracking import MetricsLogger, Progress, print_main, run_info
from alignment.errors import UserError


@dataclass
class Run:
    recipe: Any
    engine: Engine
    output_dir: Path
    logger: MetricsLogger
    info: dict
    stage: str = ""
    inputs: dict | None = None  # manifest inputs (rank 0 only)


def debug_fault(step: int, rank: int) -> None:
    """Fault injection for tests: ALIGN_DEBUG_FAIL_AT_STEP=N [ALIGN_DEBUG_FAIL_RANK=r] raises at step N."""
    at = os.environ.get("ALIGN_DEBUG_FAIL_AT_STEP")
    if at is None or int(at) != step:
        return
    who = os.environ.get("ALIGN_DEBUG_FAIL_RANK")
    if who is None or int(who) == rank:
        raise RuntimeError(f"injected failure at step {step} on rank {rank} (ALIGN_DEBUG_FAIL_AT_STEP)")


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint written; --resume continues
_stop_signal: list[str] = []


def watch_preemption() -> None:
    """SIGTERM (a scheduler's or launcher's shutdown) and SIGUSR1 (SLURM's --signal) ask every rank to write a
    checkpoint at the next step boundary and exit with PREEMPTED_EXIT_CODE, instead of dying mid-step."""
    def ask_to_stop(signum, frame):
        _stop_signal.append(signal.Signals(signum).name)
        if len(_stop_signal) > 1:  # asked twice (or stuck outside the step loop): stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, ask_to_stop)


def stop_requested(engine: Engine, step: int) -> bool:
    """Whether any rank was asked to stop; every rank calls at every step boundary (one small all-reduce), so
    they all stop at the same step. ALIGN_DEBUG_SIGNAL_AT_STEP=N [ALIGN_DEBUG_SIGNAL=TERM|USR1] makes rank 0
    signal itself after step N (tests)."""
    at = os.environ.get("ALIGN_DEBUG_SIGNAL_AT_STEP")
    if at is not None and int(at) == step and engine.dist.rank == 0:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("ALIGN_DEBUG_SIGNAL", "TERM")))
    return engine.dist.reduce_sums({"stop": 1.0 if _stop_signal else 0.0})["stop"] > 0


def step_boundary(run: Run, models: dict, step: int, steps: int, epoch_hint: int, order: dict,
                  extra: dict | None = None) -> None:
    """After an optimizer step: the periodic checkpoint, and a requested stop (checkpoint, then exit
    PREEMPTED_EXIT_CODE). torchrun turns a worker's exit code into 1, so the main rank also writes the file
    named by ALIGN_STOP_MARKER, if set, for a launcher script to exit PREEMPTED_EXIT_CODE (launch/slurm.sbatch)."""
    due = checkpoint_due(run.recipe, step) and step < steps
    if due:
        save_checkpoint(run, models, step, epoch_hint, order, extra)
    if step < steps and stop_requested(run.engine, step):
        if not due:
            save_checkpoint(run, models, step, epoch_hint, order, extra)
        why = _stop_signal[0] if _stop_signal else "another rank's signal"
        print_main(run.engine.dist.is_main, f"stopped by {why} after step {step}: checkpoint written; run the same "
                   f"command with --resume to continue (exit code {PREEMPTED_EXIT_CODE})")
        marker = os.environ.get("ALIGN_STOP_MARKER")
        if marker and run.engine.dist.is_main:  # a launcher between us and the scheduler (torchrun) exits 1
            try:
                Path(marker).write_text(f"stopped by {why} after step {step}\n")
            except OSError as exc:  # the checkpoint is written; only the launcher's exit code is lost
                print(f"warning: could not write ALIGN_STOP_MARKER {marker}: {exc}", file=sys.stderr)
        run.logger.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PREEMPTED_EXIT_CODE)  # the checkpoint is on disk; skip teardown (gloo threads can abort it)


class RunExists(UserError):
    """output_dir holds a finished run of other inputs, and --overwrite was not given."""


def refuse_to_overwrite(recipe: RecipeBase, stage: str, overwrite: bool) -> None:
    """A finished run in output_dir is replaced only by a run of the same inputs (its rerun) or with --overwrite;
    every rank checks, before any of them starts, so all stop with the same message. (--resume continues a run
    instead, under its own checks: the data order and the world size.)"""
    before = manifest.read(recipe.output_dir)
    if overwrite or before is None or not before.get("complete"):
        return
    inputs = manifest.stage_inputs(recipe)
    if before.get("inputs") == inputs:
        return
    what = "; ".join(manifest.differences(before.get("inputs", {}), inputs)) or "its inputs"
    raise RunExists(f"{recipe.output_dir} holds a finished {before.get('stage', '')} run made from other inputs "
                    f"({what}); pass --overwrite to replace it, or set another output_dir")


def setup_run(recipe: RecipeBase, stage: str, resume: bool, overwrite: bool = False) -> tuple[Run, Path | None]:
    """Engine, output directory, resolved recipe, run info and metrics logger; a finished run of other inputs in
    output_dir is refused unless `overwrite`."""
    if not resume:
        refuse_to_overwrite(recipe, stage, overwrite)
    watch_preemption()
    engine = Engine(recipe.train, recipe.deepspeed, recipe.seed)
    output_dir = Path(recipe.output_dir)
    checkpoint = None
    if resume:
        found = ckpt.list_checkpoints(output_dir / "checkpoints")
        checkpoint = found[-1] if found else None
        if checkpoint is None:
            print_main(engine.dist.is_main, f"--resume: no complete checkpoint under {output_dir / 'checkpoints'}; starting fresh")
    check_resume_world_size(checkpoint, engine.dist.world_size, recipe.deepspeed.zero_stage)
    resume_step = ckpt.read_state(checkpoint)["step"] if checkpoint else None
    info = run_info(recipe.seed, engine.dist.world_size, stage)
    info["batch"] = engine.layout.__dict__
    inputs = None
    if engine.dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, output_dir / "recipe.yaml")
        (output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        inputs = manifest.stage_inputs(recipe)
        manifest.write(output_dir, stage, inputs, info, complete=False)
        print_main(True, f"[{stage}] world size {engine.dist.world_size}, layout: micro {engine.layout.micro_batch_size} x "
                   f"accumulation {engine.layout.grad_accum_steps} x ranks {engine.dist.world_size} = global "
                   f"{engine.layout.global_batch_size}; ZeRO-{recipe.deepspeed.zero_stage}, {recipe.train.precision}, "
                   f"git {info['git_revision'][:12]}, seed {recipe.seed}")
    engine.dist.barrier()
    logger = MetricsLogger(output_dir, recipe.logging, info, enabled=engine.dist.is_main, resume_step=resume_step)
    return Run(recipe, engine, output_dir, logger, info, stage, inputs), checkpoint


def finish(run: Run, final_metrics: dict) -> None:
    """The run is done (final/ exported and verified): its manifest says so, with the final metrics."""
    if run.engine.dist.is_main:
        clean = {k: v for k, v in final_metrics.items() if isinstance(v, (int, float, str)) or v is None}
        manifest.write(run.output_dir, run.stage, run.inputs, run.info, complete=True, final_metrics=clean)
    run.logger.close()
    run.engine.close()


def attention_implementation(engine: Engine, recipe: RecipeBase, longest_row: int | None = None,
                             block_masked: bool = False) -> str | None:
    """The attention kernel every model of this run loads with (models.attention_for); rows default to
    data.max_length tokens."""
    return attention_for(recipe.model.attn_implementation, engine.dist.device.type, longest_row or recipe.data.max_length,
                         block_masked)


def load_trainable_model(engine: Engine, recipe: RecipeBase, model_path: str, kind: str = "causal_lm",
                         before_adapters: Callable | None = None, longest_row: int | None = None,
                         disable_dropout: bool = False, block_masked: bool = False):
    """Load (sharded under ZeRO-3 as it loads), then lean activations, gradient checkpointing, LoRA and
    (when asked) no dropout, as the recipe says."""
    attention = attention_implementation(engine, recipe, longest_row, block_masked)
    with engine.model_init():
        model = load_model(model_path, kind, trust_remote_code=recipe.model.trust_remote_code,
                           revision=recipe.model.revision, attn_implementation=attention)
    print_main(engine.dist.is_main, f"attention: {model.config._attn_implementation}"
               f"{'' if recipe.model.attn_implementation else ' (automatic: model.attn_implementation unset)'}")
    if before_adapters is not None:
        before_adapters(model)
    if recipe.model.lean_activations:
        lean = make_lean(model)
        print_main(engine.dist.is_main, f"lean activations: {lean['rmsnorm']} RMSNorm and {lean['mlp']} MLP modules")
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if recipe.lora.enabled:
        if recipe.model.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, recipe.lora, task_type="CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS")
    if disable_dropout:
        turned_off = turn_off_dropout(model)
        if turned_off:
            print_main(engine.dist.is_main, f"dropout: {turned_off} dropout layers set to 0 (disable_dropout)")
    return model


def total_steps(recipe: RecipeBase, steps_per_epoch: int) -> int:
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    return max(1, int(round(recipe.train.num_epochs * steps_per_epoch)))


LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]]


def accumulated_step(engine: Engine, model, micro_batches: list[dict], count: Callable[[dict], float],
                     loss_fn: LossFn, step: int) -> dict[str, float]:
    """One optimizer step: forward/backward each micro-batch, normalised by the global item count.

    loss_fn(model, batch) returns (sum of per-item losses on this micro-batch, metric sums).
    Returns the metric sums reduced over ranks plus "count" (the global normaliser) and "lr".
    A non-finite loss on any rank stops the run before it reaches the weights.
    """
    lr = engine.current_lr(model)  # the LR this update uses (the schedule advances at its end)
    normalizer = engine.dist.global_sum(sum(count(b) for b in micro_batches))
    if normalizer <= 0:
        raise RuntimeError(f"step {step}: the global batch has no trainable items")
    sums: Counter = Counter()
    for batch in micro_batches:
        loss_sum, stats = loss_fn(model, batch)
        bad = 0.0 if torch.isfinite(loss_sum).item() else 1.0
        if engine.dist.reduce_max(bad) > 0:
            raise FloatingPointError(
                f"step {step}: non-finite loss on {'this' if bad else 'another'} rank; stopping before the update "
                "(check the learning rate, the precision, or the data)"
            )
        engine.backward(model, loss_sum / normalizer)
        engine.step(model)
        sums.update(stats)
    allocator.trim_heap()
    reduced = engine.dist.reduce_sums(dict(sums))
    reduced["count"] = normalizer
    reduced["lr"] = lr
    return reduced


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def checkpoint_due(recipe: RecipeBase, step: int) -> bool:
    return recipe.train.save_interval > 0 and step % recipe.train.save_interval == 0


def eval_due(recipe: RecipeBase, step: int, last: int) -> bool:
    interval = recipe.train.eval_interval
    return step == last or (interval > 0 and step % interval == 0)


def data_order(items_fingerprint: str, num_items: int, engine: Engine, seed: int) -> dict:
    """What determines which examples each step trains on: the items in order, the global batch, the seed.
    (Not the world size: a global batch holds the same examples however many ranks share it.)"""
    return {"items_fingerprint": items_fingerprint, "items": num_items,
            "global_batch_size": engine.layout.global_batch_size, "seed": seed}


class ResumeMismatch(RecipeError):
    """--resume from a checkpoint whose run would have trained on other examples at its steps."""


def check_resume(checkpoint: Path | None, order: dict) -> None:
    """Refuse to resume when the data order differs from the checkpoint's (a changed data file,
    tokenizer, max_length, max_rows, global batch size or seed): the steps after it would train on
    other examples than the steps before it chose them for."""
    if checkpoint is None:
        return
    saved = ckpt.read_state(checkpoint).get("data_order")
    if saved is None or saved == order:
        return
    causes = {"items_fingerprint": "the training examples (data.train, data.max_rows, data.max_length, the "
              "tokenizer or the chat template)", "items": "the number of training examples",
              "global_batch_size": "train.global_batch_size", "seed": "seed"}
    changes = [f"{causes[k]}: {saved.get(k)!s:.16} -> {order[k]!s:.16}" for k in causes if saved.get(k) != order[k]]
    raise ResumeMismatch(f"--resume: the data order changed since {checkpoint} was written, so the remaining "
                         f"steps would not continue that run; changed: {'; '.join(changes)}. Resume with the "
                         "recipe it was written with, or start a new output_dir.")


def check_resume_world_size(checkpoint: Path | None, world_size: int, zero_stage: int) -> None:
    """Refuse, before any model loads, to resume a ZeRO 1-3 checkpoint with another number of ranks: each rank's
    file holds its own partition of the optimizer state, and DeepSpeed cannot re-partition it on load (it fails
    deep inside load_checkpoint). The data position itself does not depend on the world size (data_order)."""
    if checkpoint is None or zero_stage < 1:
        return
    saved = ckpt.read_state(checkpoint).get("world_size")
    if saved is not None and saved != world_size:
        raise ResumeMismatch(f"--resume: {checkpoint} was written by {saved} rank(s) and this run has {world_size}; "
                             f"under ZeRO stage {zero_stage} each rank's file holds its own partition of the optimizer "
                             f"state, which DeepSpeed cannot re-partition. Resume with {saved} rank(s) (--nproc "
                             f"{saved}, or nodes x GPUs = {saved}), or start a new output_dir from an exported model.")


def save_checkpoint(run: Run, models: dict, step: int, epoch_hint: int, order: dict, extra: dict | None = None) -> None:
    """checkpoints/step-N for the stage's trainable models (name -> prepared engine), its data order, and any
    state of the stage's own (`extra`, JSON: e.g. PPO's KL coefficient)."""
    path = ckpt.save_checkpoint(run.engine, run.output_dir / "checkpoints", models,
                                {"step": step, "epoch": epoch_hint, "data_order": order, **(extra or {})},
                                keep=run.recipe.train.keep_checkpoints)
    print_main(run.engine.dist.is_main, f"checkpoint written: {path}")


def resume(run: Run, checkpoint: Path | None, models: dict) -> int:
    """Restore the models and RNG from `checkpoint` (None: a fresh run); the step to continue after."""
    if checkpoint is None:
        return 0
    step = int(ckpt.load_checkpoint(run.engine, checkpoint, models)["step"])
    print_main(run.engine.dist.is_main, f"resuming from {checkpoint} (step {step})")
    return step


class Clock:
    """Wall time between laps: an optimizer step's (`lap()`, for throughput metrics), or the named phases of an
    RL iteration (`lap("rollout")`, kept in `times`)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, name: str | None = None) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        if name is not None:
            self.times[name] = elapsed
        return elapsed


def make_progress(run: Run, total: int, start: int, desc: str) -> Progress:
    return Progress(total, start, enabled=run.engine.dist.is_main and run.recipe.logging.progress_bar, desc=desc)
