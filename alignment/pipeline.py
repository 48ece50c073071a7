"""`align pipeline`: SFT -> reward model -> DPO, chained, each stage in its own process.

Each stage runs its own recipe with its output under the pipeline's output_dir; the
DPO policy starts from the SFT export (merged weights when SFT used LoRA). Gold
scores on the built-in task's held-out prompts are collected into
output_dir/pipeline.json, and the reward model's held-out accuracy with them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import register_stage


@dataclass
class PipelineStage:
    recipe: str = "???"
    """Path of the stage's own recipe."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for that recipe, as with --set."""
    enabled: bool = True


@dataclass
class PipelineRecipe:
    output_dir: str = "???"
    seed: int = 0
    nproc: int = 1
    """Local ranks for every stage."""
    sft: PipelineStage = field(default_factory=PipelineStage)
    rm: PipelineStage = field(default_factory=PipelineStage)
    dpo: PipelineStage = field(default_factory=PipelineStage)


register_stage("pipeline", PipelineRecipe)


def _final_model(stage_dir: Path) -> str:
    final = stage_dir / "final"
    return str(final / "merged") if (final / "merged").is_dir() else str(final)


def _last_metrics(stage_dir: Path) -> dict:
    merged: dict = {}
    path = stage_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                merged.update(json.loads(line))
    return merged


def run(recipe: PipelineRecipe, resume: bool = False) -> dict:
    from alignment.config import load_recipe

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stages": {}}
    previous_policy = None
    for name in ("sft", "rm", "dpo"):
        stage: PipelineStage = getattr(recipe, name)
        if not stage.enabled:
            continue
        stage_dir = out / name
        overrides = [f"output_dir={stage_dir}", f"seed={recipe.seed}", *stage.overrides]
        if name == "dpo" and previous_policy:
            overrides.append(f"model.name_or_path={previous_policy}")
        load_recipe(stage.recipe, name, overrides)  # fail fast on a bad stage recipe, before any training
        cmd = [sys.executable, "-m", "alignment.cli", name, stage.recipe, "--nproc", str(recipe.nproc)]
        for item in overrides:
            cmd += ["--set", item]
        if resume:
            cmd.append("--resume")
        print(f"\n=== pipeline stage {name}: {' '.join(cmd[2:])}", flush=True)
        started = time.time()
        code = subprocess.call(cmd)
        if code != 0:
            raise RuntimeError(f"pipeline stage {name} failed with exit code {code}")
        metrics = _last_metrics(stage_dir)
        summary["stages"][name] = {
            "output_dir": str(stage_dir),
            "minutes": round((time.time() - started) / 60, 2),
            **{k: v for k, v in metrics.items() if k.startswith(("gold/", "eval/"))},
        }
        if name == "sft":
            previous_policy = _final_model(stage_dir)
    (out / "pipeline.json").write_text(json.dumps(summary, indent=2))
    print("\n=== pipeline summary")
    for name, info in summary["stages"].items():
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()
                 if k.startswith(("gold/score", "eval/accuracy", "eval/rewards/accuracies", "eval/loss")) or k == "minutes"}
        print(f"  {name:4s} {shown}")
    return summary
