"""What every stage does around its training loop, written once: the gold score of the model it starts from,
then, when training is over, the export of what trained (reloaded in a fresh process and checked), the gold
score of that export, and the manifest that says the run finished.

Results have one name each: `Gold.before` / `Gold.after` (the dicts of alignment.evaluate.gold.gold_eval),
logged as `gold/score_before` at step 0 and `gold/score`, `gold/exact` at the last step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignment.core import loop
from alignment.core.export import export_model
from alignment.core.recipes import GoldEvalConfig
from alignment.core.tracking import print_main
from alignment.data.report import DataReport, write_left_out
from alignment.evaluate.gold import gold_eval


@dataclass
class Gold:
    """A stage's gold scores: of the model it started from, and of its export (None when not measured)."""

    cfg: GoldEvalConfig
    before: dict | None = None
    after: dict | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("before", self.before), ("after", self.after)) if v is not None}


def report_data(job: loop.Run, reports: list[DataReport]) -> None:
    """Print each data report (where its rows came from, what was kept, where the dropped rows were) and write
    every row left out to output_dir/dropped.jsonl (rank 0)."""
    for report in reports:
        if report.rows_read or report.source:
            print_main(job.engine.dist.is_main, report.format() if report.rows_read else
                       f"data report [{report.name}]: {report.source}")
    if job.engine.dist.is_main:
        path = write_left_out(reports, job.output_dir)
        if path is not None:
            print_main(True, f"rows left out, each with its reason and origin: {path}")


def score_start(job: loop.Run, model_path: str, cfg: GoldEvalConfig, start: int) -> Gold:
    """The starting model's gold score, on a fresh run whose recipe asks for one (gold_eval.prompts)."""
    gold = Gold(cfg)
    if cfg.prompts and start == 0:
        gold.before = gold_eval(job.engine, model_path, cfg, job.recipe.model, base=True,
                                samples_to=job.output_dir / "gold_samples_before.jsonl")
        job.logger.log({"gold/score_before": gold.before["gold/score"],
                        **{f"{k}_before": v for k, v in gold.before.items()
                           if k.startswith(("gold/", "gold_sampled/")) and k not in ("gold/score", "gold/n")}}, step=0)
    return gold


def finish(job: loop.Run, trained, tokenizer, *, kind: str, base_path: str, step: int, metrics: dict,
           gold: Gold | None = None, extra_config: dict | None = None,
           also: tuple[tuple[object, str, str, str], ...] = ()) -> Path:
    """Training is over: Adam's moments go (so export, its reload check and the gold score run without them),
    `trained` is exported to output_dir/final and verified, each of `also` ((model, subfolder, kind, base
    path): PPO's critic) beside it, the export's gold score taken, and the manifest marked complete with the
    final metrics."""
    engine, recipe = job.engine, job.recipe
    for model in (trained, *(item[0] for item in also)):
        engine.release_optimizer_state(model)
    common = dict(lora_cfg=recipe.lora, precision=recipe.train.precision, model_cfg=recipe.model)
    final = export_model(engine, trained, tokenizer, job.output_dir / "final", kind=kind, base_path=base_path,
                         extra_config=extra_config, **common)
    for model, subfolder, sub_kind, sub_base in also:
        export_model(engine, model, tokenizer, final / subfolder, kind=sub_kind, base_path=sub_base, **common)
    print_main(engine.dist.is_main, f"exported and verified: {final}")
    if gold is not None and gold.cfg.prompts:
        gold.after = gold_eval(engine, str(final), gold.cfg, recipe.model,
                               samples_to=job.output_dir / "gold_samples_after.jsonl")
        job.logger.log({k: v for k, v in gold.after.items() if k.startswith(("gold/", "gold_sampled/"))}, step=step)
        if gold.before is not None:
            print_main(engine.dist.is_main, f"gold score on {int(gold.after['gold/n'])} held-out prompts: "
                       f"{gold.before['gold/score']:.3f} before -> {gold.after['gold/score']:.3f} after")
    loop.finish(job, {**metrics, **(gold.after if gold is not None and gold.after else {})})
    return final
