"""`align pipeline`: SFT -> reward model -> on-policy pairs -> DPO, each stage in its own process.

Each stage runs its own recipe with its output under the pipeline's output_dir; the
DPO policy starts from the SFT export (merged weights when SFT used LoRA). When the
`pairs` stage is on, the SFT policy's own samples, ranked by a judge (the built-in
verifier or the pipeline's reward model), replace DPO's training pairs. Gold
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

from alignment.core.config import register_stage


@dataclass
class PipelineStage:
    recipe: str = "???"
    """Path of the stage's own recipe."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for that recipe, as with --set."""
    enabled: bool = True


@dataclass
class PairsStage:
    """On-policy pairs from the SFT policy (`align pairs`), used as DPO's training data."""
    enabled: bool = False
    prompts: str = "builtin:prompts_train"
    judge: str = "gold"
    """'gold' (the built-in task's verifier) or 'rm' (this pipeline's reward model)."""
    num_prompts: int = 256
    samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 24


@dataclass
class PipelineRecipe:
    output_dir: str = "???"
    seed: int = 0
    nproc: int = 1
    """Local ranks for every stage."""
    sft: PipelineStage = field(default_factory=PipelineStage)
    rm: PipelineStage = field(default_factory=PipelineStage)
    pairs: PairsStage = field(default_factory=PairsStage)
    dpo: PipelineStage = field(default_factory=PipelineStage)

    def validate(self) -> None:
        if self.pairs.enabled and self.pairs.judge not in ("gold", "rm"):
            raise ValueError(f"pairs.judge must be 'gold' or 'rm', got {self.pairs.judge!r}")
        if self.pairs.enabled and self.pairs.judge == "rm" and not self.rm.enabled:
            raise ValueError("pairs.judge 'rm' needs the rm stage enabled")
        if self.pairs.enabled and not (self.sft.enabled and self.dpo.enabled):
            raise ValueError("the pairs stage samples from the SFT policy for DPO: enable sft and dpo")
        if self.pairs.enabled and self.pairs.samples < 2:
            raise ValueError("pairs.samples must be at least 2")


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
    from alignment.core.config import load_recipe

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stages": {}}
    previous_policy = None
    pairs_file = None
    for name in ("sft", "rm", "pairs", "dpo"):
        stage = getattr(recipe, name)
        if not stage.enabled:
            continue
        stage_dir = out / name
        started = time.time()
        if name == "pairs":
            pairs_file = stage_dir / "pairs.jsonl"
            judge = "gold" if stage.judge == "gold" else _final_model(out / "rm")
            cmd = [sys.executable, "-m", "alignment.cli", "pairs", "--model", previous_policy,
                   "--prompts", stage.prompts, "--judge", judge, "--out", str(pairs_file),
                   "--num-prompts", str(stage.num_prompts), "--samples", str(stage.samples),
                   "--temperature", str(stage.temperature), "--max-new-tokens", str(stage.max_new_tokens),
                   "--seed", str(recipe.seed)]
            print(f"\n=== pipeline stage pairs: {' '.join(cmd[2:])}", flush=True)
            if subprocess.call(cmd) != 0:
                raise RuntimeError("pipeline stage pairs failed")
            report = json.loads((stage_dir / "pairs.report.json").read_text())
            summary["stages"][name] = {"output_dir": str(stage_dir), "minutes": round((time.time() - started) / 60, 2),
                                       "pairs": report["pairs"], "gold/sample_score" if stage.judge == "gold"
                                       else "judge/mean_sample_score": report["mean_sample_score"]}
            continue
        overrides = [f"output_dir={stage_dir}", f"seed={recipe.seed}", *stage.overrides]
        if name == "dpo" and previous_policy:
            overrides.append(f"model.name_or_path={previous_policy}")
        if name == "dpo" and pairs_file:
            overrides.append(f"data.train={pairs_file}")
        load_recipe(stage.recipe, name, overrides)  # fail fast on a bad stage recipe, before any training
        cmd = [sys.executable, "-m", "alignment.cli", name, stage.recipe, "--nproc", str(recipe.nproc)]
        for item in overrides:
            cmd += ["--set", item]
        if resume:
            cmd.append("--resume")
        print(f"\n=== pipeline stage {name}: {' '.join(cmd[2:])}", flush=True)
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
                 if k.startswith(("gold/", "eval/accuracy", "eval/rewards/accuracies", "eval/loss"))
                 or k in ("minutes", "pairs")}
        print(f"  {name:4s} {shown}")
    return summary
