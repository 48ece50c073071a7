"""`align pipeline`: SFT -> reward model -> on-policy pairs -> DPO -> online RL, each stage in its own process.

Each stage runs its own recipe with its output under the pipeline's output_dir; the
DPO policy starts from the SFT export (merged weights when SFT used LoRA). When the
`pairs` stage is on, the SFT policy's own samples, ranked by a judge (the built-in
verifier or the pipeline's reward model), replace DPO's training pairs. Gold
scores on the built-in task's held-out prompts are collected into
output_dir/pipeline.json, and the reward model's held-out accuracy with them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alignment.core import manifest
from alignment.core.config import RecipeError
from alignment.core.fingerprint import file_fingerprint, model_fingerprint
from alignment.core.models import load_tokenizer, resolve_model_path
from alignment.core.recipes import PipelineRecipe, load_recipe
from alignment.data.sources import resolve_source
from alignment.evaluate.report import write_report


@dataclass
class PlannedStage:
    name: str
    directory: Path
    command: list[str]      # after `python -m alignment.cli`
    recipe: object = None   # the stage's recipe, loaded and fully checked (training stages)


def _policy_dir(stage_dir: Path, stage_recipe) -> Path:
    """Where a stage's exported policy will be: the merged weights when it trains LoRA with a merge."""
    final = stage_dir / "final"
    lora = stage_recipe.lora
    return final / "merged" if lora.enabled and lora.merge_on_export else final


def plan(recipe: PipelineRecipe) -> list[PlannedStage]:
    """Every enabled stage with its command and overrides, each training stage's recipe loaded with the
    same checks `align STAGE` runs: a mistake in the last stage stops the pipeline before the first trains."""

    out = Path(recipe.output_dir)
    planned: list[PlannedStage] = []
    recipes: dict = {}
    policy = pairs_file = None
    rounds = recipe.pairs.rounds if recipe.pairs.enabled else 1
    order = [("sft", "sft", 1), ("rm", "rm", 1)]  # (stage, directory name, round)
    for r in range(1, rounds + 1):
        suffix = "" if r == rounds else f"-round{r}"
        order += [("pairs", "pairs" + suffix, r), ("dpo", "dpo" + suffix, r)]
    order.append(("ppo", "ppo", 1))
    for name, label, round_index in order:
        stage = getattr(recipe, name)
        if not stage.enabled:
            continue
        stage_dir = out / label
        if name == "pairs":
            pairs_file = stage_dir / "pairs.jsonl"
            judge = "gold" if stage.judge == "gold" else str(_policy_dir(out / "rm", recipes["rm"]))
            command = ["pairs", "--model", str(policy), "--prompts", stage.prompts, "--judge", judge,
                       "--out", str(pairs_file), "--num-prompts", str(stage.num_prompts), "--samples",
                       str(stage.samples), "--temperature", str(stage.temperature), "--max-new-tokens",
                       str(stage.max_new_tokens), "--chosen", stage.chosen, "--seed", str(recipe.seed),
                       "--offset", str((round_index - 1) * stage.num_prompts)]  # new prompts each round
            planned.append(PlannedStage(label, stage_dir, command))
            continue
        overrides = [f"output_dir={stage_dir}", f"seed={recipe.seed}", *stage.overrides]
        if name == "dpo" and policy:
            overrides.append(f"model.name_or_path={policy}")
        if name == "dpo" and pairs_file:
            overrides.append(f"data.train={pairs_file}")
        if name == "ppo":
            start = "dpo" if stage.start_from == "dpo" and "dpo" in recipes else "sft"
            overrides.append(f"model.name_or_path={_policy_dir(out / start, recipes[start])}")
            if stage.reward:
                rm = f"{{source: {_policy_dir(out / 'rm', recipes['rm'])}, normalize: true}}" if "rm" in recipes else ""
                sources = {"gold": ["{source: gold}"], "rm": [rm], "gold+rm": ["{source: gold}", rm]}[stage.reward]
                overrides.append(f"ppo.rewards=[{', '.join(sources)}]")
        stage_recipe = recipes[name] = load_recipe(stage.recipe, name, overrides)
        command = [name, stage.recipe, "--nproc", str(recipe.nproc)] + [x for o in overrides for x in ("--set", o)]
        planned.append(PlannedStage(label, stage_dir, command, stage_recipe))
        if name in ("sft", "dpo"):  # the next round samples from, and starts from, this policy
            policy = _policy_dir(stage_dir, stage_recipe)
    return planned


def tokenizer_signature(tokenizer) -> dict:
    """What must agree across a pipeline's stages: the vocabulary, the special tokens, the chat template."""
    import hashlib

    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    return {"vocabulary": vocab, "special tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "chat template": tokenizer.chat_template}


def check_tokenizers(recipe: PipelineRecipe, planned: list[PlannedStage]) -> None:
    """The stages that start from a model of their own (not an earlier stage's export) must share one
    tokenizer: a reward model that renders conversations another way than the policy scores another text.
    Raises before anything trains."""

    out = Path(recipe.output_dir).resolve()
    seen: dict[str, tuple[str, dict]] = {}
    for step in planned:
        if step.recipe is None:
            continue
        model = step.recipe.model
        source = Path(model.name_or_path).expanduser()
        if source.resolve().is_relative_to(out):
            continue  # an earlier stage's export: it carries that stage's tokenizer
        key = f"{model.tokenizer or model.name_or_path}@{model.revision}"
        if key not in seen:
            path = model.tokenizer or resolve_model_path(model.name_or_path)
            tokenizer = load_tokenizer(path, model.trust_remote_code, None if model.tokenizer else model.revision)
            seen[key] = (step.name, tokenizer_signature(tokenizer))
    if len(seen) < 2:
        return
    (first_stage, first), *others = seen.values()
    for stage, signature in others:
        differ = [k for k in first if first[k] != signature[k]]
        if differ:
            raise RecipeError(f"pipeline stages {first_stage} and {stage} use different tokenizers (different "
                              f"{', '.join(differ)}): every stage of one pipeline must render and tokenize "
                              "conversations the same way")


def _pairs_inputs(step: PlannedStage) -> dict:

    args = dict(zip(step.command[1::2], step.command[2::2]))
    judge = args["--judge"]
    prompts = Path(resolve_source(args["--prompts"]))
    return {"recipe": json.dumps([a for a in step.command if not a.startswith(str(step.directory))]),
            "files": {"policy": model_fingerprint(args["--model"]),
                      "judge": judge if judge == "gold" else model_fingerprint(judge),
                      "prompts": file_fingerprint(prompts) if prompts.is_file() else args["--prompts"]}}


def _decide(step: PlannedStage, inputs: dict, resume: bool) -> str:
    """'skip', 'resume' or 'run' for a stage, from what its manifest says; clears stale checkpoints."""

    before = manifest.read(step.directory)
    if before is None:
        return "run"
    if before.get("inputs") == inputs:
        if before.get("complete"):
            print(f"\n=== pipeline stage {step.name}: finished with the same inputs, skipped ({step.directory}; "
                  "delete it to run the stage again)", flush=True)
            return "skip"
        if resume:
            return "resume"
        print(f"\n=== pipeline stage {step.name}: an interrupted run is there; starting over (--resume continues it)",
              flush=True)
    else:
        what = ", ".join(manifest.changed(before.get("inputs", {}), inputs))
        verb = "finished" if before.get("complete") else "was interrupted"
        detail = "".join(f"\n    {line}" for line in manifest.differences(before.get("inputs", {}), inputs))
        print(f"\n=== pipeline stage {step.name}: inputs changed since it {verb} ({what}); running it again{detail}",
              flush=True)
    shutil.rmtree(step.directory / "checkpoints", ignore_errors=True)  # never resume another run's state
    return "run"


def _last_metrics(stage_dir: Path) -> dict:
    merged: dict = {}
    path = stage_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                merged.update(json.loads(line))
    return merged


def run(recipe: PipelineRecipe, resume: bool = False, dry_run: bool = False) -> dict:

    planned = plan(recipe)  # step 0: every stage's recipe checked before anything trains
    check_tokenizers(recipe, planned)
    if dry_run:
        for step in planned:
            print(" ".join(["align", *step.command]))
        return {"stages": {}}
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stages": {}}
    for step in planned:
        started = time.time()
        is_pairs = step.command[0] == "pairs"
        inputs = _pairs_inputs(step) if is_pairs else manifest.stage_inputs(step.recipe)
        decision = _decide(step, inputs, resume)
        if decision != "skip":
            # A stage the pipeline reruns (its inputs changed: said above) replaces its own finished run.
            again = ["--resume"] if decision == "resume" else [] if is_pairs else ["--overwrite"]
            cmd = [sys.executable, "-m", "alignment.cli", *step.command, *again]
            print(f"\n=== pipeline stage {step.name}: {' '.join(cmd[2:])}", flush=True)
            code = subprocess.call(cmd)
            if code != 0:
                raise RuntimeError(f"pipeline stage {step.name} failed with exit code {code}")
            if is_pairs:  # `align pairs` is not a training stage: its manifest is written here
                step.directory.mkdir(parents=True, exist_ok=True)
                manifest.write(step.directory, "pairs", inputs, {}, complete=True)
        minutes = round((time.time() - started) / 60, 2)
        if is_pairs:
            report = json.loads((step.directory / "pairs.report.json").read_text())
            score_key = ("gold/sample_score" if "--judge" in step.command and
                         step.command[step.command.index("--judge") + 1] == "gold" else "judge/mean_sample_score")
            summary["stages"][step.name] = {"output_dir": str(step.directory), "minutes": minutes,
                                          "pairs": report["pairs"], score_key: report["mean_sample_score"]}
            continue
        metrics = _last_metrics(step.directory)
        summary["stages"][step.name] = {
            "output_dir": str(step.directory), "minutes": minutes, "skipped": decision == "skip",
            **{k: v for k, v in metrics.items() if k.startswith(("gold/", "eval/"))},
        }
    (out / "pipeline.json").write_text(json.dumps(summary, indent=2))
    scores = scores_summary(summary["stages"])
    (out / "summary.json").write_text(json.dumps(scores, indent=2))

    training = {s.name: s.directory for s in planned if s.command[0] != "pairs"}
    report = write_report(out, training, scores, title=f"align pipeline: {out}")
    print("\n=== pipeline summary")
    for name, info in summary["stages"].items():
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()
                 if k.startswith(("gold/", "eval/accuracy", "eval/rewards/accuracies", "eval/loss"))
                 or k in ("minutes", "pairs", "skipped")}
        print(f"  {name:4s} {shown}")
    print("\n" + scores_line(scores))
    if scores.get("families"):
        print(family_lines(scores["families"]))
    print(f"summary: {out / 'summary.json'}; report: {report}")
    return summary


def scores_line(scores: dict) -> str:
    """The console's one line of summary.json: what was measured, and what was not."""
    measured = [f"{k} {v:.3f}" for k, v in scores["gold"].items() if v is not None]
    missing = [k for k, v in scores["gold"].items() if v is None]
    if measured:
        line = "held-out gold score after each stage: " + ", ".join(measured)
        if missing:
            line += f" (not measured: {', '.join(missing)})"
    elif missing:
        line = f"held-out gold score: not measured ({', '.join(missing)} ran without gold_eval)"
    else:
        line = "held-out gold score: not measured (no policy stage ran)"
    rm = scores.get("rm_accuracy")
    return line + (f"; reward model held-out accuracy {rm:.3f}" if rm is not None else "; no reward model accuracy")


def scores_summary(stages: dict) -> dict:
    """summary.json: {"gold": {"base": .., "sft": .., "dpo": .., "ppo": ..}, "rm_accuracy": ..}; the base
    score is the one the first policy stage measured before training; a stage that did not run is left out."""
    gold: dict = {}
    families: dict = {}
    for name in ("sft", "dpo", "ppo"):
        info = stages.get(name)
        if info is None:
            continue
        if not gold and "gold/score_before" in info:
            gold["base"] = info["gold/score_before"]
            families["base"] = family_table(info, "_before")
        gold[name] = info.get("gold/score")
        families[name] = family_table(info, "")
    rm = stages.get("rm", {})
    result = {"gold": gold, "rm_accuracy": rm.get("eval/accuracy")}
    if any(families.values()):
        result["families"] = families
    rounds = {k: v.get("gold/score") for k, v in stages.items() if k.startswith("dpo-round")}
    if rounds:  # online DPO: the gold score after every round, the last being "dpo"
        result["dpo_rounds"] = {**rounds, "dpo": gold.get("dpo")}
    return result


def family_table(info: dict, suffix: str) -> dict:
    """{"greedy": {family: score, "all": score}, "sampled": {...}} from a stage's gold/<family> and
    gold_sampled/<family> metrics (its starting model's with suffix "_before")."""
    out: dict = {}
    for kind, prefix in (("greedy", "gold/"), ("sampled", "gold_sampled/")):
        table = {}
        for key, value in info.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is None or (suffix and not name.endswith(suffix)) or (not suffix and name.endswith("_before")):
                continue
            name = name[: -len(suffix)] if suffix else name
            if name not in ("exact", "n"):
                table["all" if name == "score" else name] = value
        if table:
            out[kind] = table
    return out


def family_lines(families: dict) -> str:
    """The held-out gold score by family after each stage, greedy / sampled, as a plain table."""
    names = sorted({f for table in families.values() for kind in table.values() for f in kind if f != "all"})
    head = f"{'model':6s} " + " ".join(f"{n[:22]:>23s}" for n in ["all", *names])
    rows = [head]
    for stage, table in families.items():
        cells = []
        for name in ["all", *names]:
            greedy = table.get("greedy", {}).get(name)
            sampled = table.get("sampled", {}).get(name)
            cell = "-" if greedy is None else f"{greedy:.3f}" + ("" if sampled is None else f" / {sampled:.3f}")
            cells.append(f"{cell:>23s}")
        rows.append(f"{stage:6s} " + " ".join(cells))
    return "\nheld-out gold score by family (greedy / sampled):\n" + "\n".join(rows)
