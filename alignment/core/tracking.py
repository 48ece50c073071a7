"""Metrics and progress: metrics.jsonl always, wandb when enabled, a progress bar on rank 0.

Only global rank 0 writes. Values handed to :meth:`MetricsLogger.log` must already
be reduced across ranks (the engine does that). A failing tracker is reported
once and switched off; it never stops training.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from alignment.core.allocator import host_allocator_state


def git_revision(path: str | Path | None = None) -> str:
    here = Path(path or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, MiB: resident set (host RAM; on CPU runs, everything) and, with CUDA,
    the peak allocated on its GPU. `align estimate` predicts these."""
    out = {"memory/peak_rss_mib": round(_peak_rss_kib() / 1024, 1)}
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["memory/peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _peak_rss_kib() -> float:
    """VmHWM: this process image's own peak RSS. Not getrusage's ru_maxrss, which Linux carries across
    execve: a run started from a large process (a test worker, a benchmark holding a model) would report
    its parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_info(seed: int, world_size: int, stage: str) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "transformers", "deepspeed", "peft", "trl", "datasets", "wandb"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "stage": stage,
        "seed": seed,
        "world_size": world_size,
        "git_revision": git_revision(),
        "versions": versions,
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": sys.argv,
        "host_allocator": host_allocator_state(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricsLogger:
    """Writes one JSON object per line to output_dir/metrics.jsonl (and to wandb)."""

    def __init__(self, output_dir: str | Path, logging_cfg, info: dict, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # Drop lines logged after the checkpoint we resume from: they will be logged again.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._start_wandb(logging_cfg, info, output_dir, resume_step is not None)

    def _start_wandb(self, cfg, info: dict, output_dir, resumed: bool) -> None:
        mode = cfg.wandb
        if mode == "disabled":
            return
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        try:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project,
                name=cfg.run_name,
                mode=mode,
                dir=str(output_dir),
                config=info,
                resume="allow" if resumed else None,
            )
        except Exception as exc:  # a tracker must never stop training
            warnings.warn(f"wandb could not start ({exc!r}); metrics go to metrics.jsonl only")
            self.wandb_run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if any(k.startswith("train/") for k in metrics):
            record.update(peak_memory())
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)
            except Exception as exc:
                warnings.warn(f"wandb.log failed at step {step} ({exc!r}); wandb switched off for this run")
                self.wandb_run = None

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as exc:
                warnings.warn(f"wandb.finish failed ({exc!r})")
            self.wandb_run = None


class Progress:
    """A tqdm bar on rank 0 showing loss, tokens/s and ETA (tqdm computes the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = None
        self.tokens = 0
        self.started = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.started)

    def update(self, tokens: int, **fields: Any) -> None:
        self.tokens += tokens
        if self.bar is None:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        shown["tok/s"] = f"{self.tokens_per_second():,.0f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_main(is_main: bool, *args: Any) -> None:
    if is_main:
        print(*args, flush=True)
