"""`align estimate` against the measured peak memory of SmolLM2-135M runs on this machine.

    .venv/bin/python -m bench.estimate [--steps 4] [--stages sft rm dpo]

For each recipe (configs/smollm2/sft.yaml, rm-hh.yaml, dpo-hh.yaml, as they are, --steps optimizer
steps, no eval or saving) this runs the stage, reads the largest `memory/peak_rss_mib` it logged
(the rank's peak resident memory: on CPU every byte a run uses), and runs `align estimate` on the
same recipe. The goal is an estimate within 25% of the measured peak. Prints per stage

    RESULT name=estimate-vs-measured-<stage> ours=<estimated MiB> peer=<measured MiB> unit=MiB ratio=<est/measured>

(here "peer" is the measurement, not another tool).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.harness import QUIET, argument_parser, cli_command, read_jsonl, result_line, run_logged, smollm2_path

MODULE = "bench.estimate"
RECIPES = {"sft": "configs/smollm2/sft.yaml", "rm": "configs/smollm2/rm-hh.yaml", "dpo": "configs/smollm2/dpo-hh.yaml"}


def main(argv=None) -> int:
    p = argument_parser(MODULE, __doc__)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--stages", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = p.parse_args(argv)
    smollm2_path()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        for stage in args.stages:
            out = Path(tmp) / stage
            sets = [f"output_dir={out}", f"train.max_steps={args.steps}", *QUIET, "data.max_eval_rows=0"]
            if stage == "sft":
                sets.append("sft.gold_eval.prompts=null")
            run_logged(cli_command([stage, RECIPES[stage]], sets), Path(tmp) / f"{stage}.log", stage)
            measured = max(r["memory/peak_rss_mib"] for r in read_jsonl(out / "metrics.jsonl")
                           if "memory/peak_rss_mib" in r)
            est_json = Path(tmp) / f"{stage}-estimate.json"
            run_logged(cli_command(["estimate", RECIPES[stage], "--json", str(est_json)], sets),
                       Path(tmp) / f"{stage}-estimate.log", f"{stage}-estimate")
            log = (Path(tmp) / f"{stage}-estimate.log").read_text()
            print(log[log.index("align estimate:"):], flush=True)
            estimated = json.loads(est_json.read_text())["total_mib"]
            rows.append((stage, estimated, measured))
    print(f"\n{'stage':<6} {'estimated MiB':>14} {'measured MiB':>13} {'error':>7}")
    for stage, est, meas in rows:
        print(f"{stage:<6} {est:>14.0f} {meas:>13.0f} {est / meas - 1:>+7.1%}")
    for stage, est, meas in rows:
        result_line(f"estimate-vs-measured-{stage}", est, meas, "MiB", digits=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
