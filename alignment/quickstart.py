"""`make quickstart`: the built-in pipeline end to end on SmolLM2-135M-Instruct, on CPU.

Step 1 writes the built-in task's data files (SFT demonstrations, preference pairs,
prompt sets with gold specs) so you can look at them. Step 2 runs the pipeline of
configs/smollm2/pipeline.yaml: SFT -> reward model -> DPO -> GRPO, ending with the gold
score on held-out prompts after each stage, by family, and the reward model's accuracy
(runs/quickstart/summary.json) and runs/quickstart/report.html. Step 3 measures what the
RL stage taught where it trained: GRPO trains on the constraints family's RL prompts
(configs/smollm2/grpo.yaml), so its policy and the policy it started from answer 256 held-out
constraint prompts (`builtin:prompts_eval_constraints`: no stage trained on them; 149 of them
hold pairs of constraints no training split holds), scored paired, prompt by prompt, with
`align eval`; summary.json gets the result as `rl_constraints`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/quickstart")
CONSTRAINT_PROMPTS, CONSTRAINT_NUM = "builtin:prompts_eval_constraints", 256


def run(cmd: list[str]) -> None:
    print("+ align", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def rl_constraints(eval_json: Path, before: str) -> dict:
    """summary.json's `rl_constraints`: the RL stage's paired gain on the held-out constraint prompts."""
    result = json.loads(eval_json.read_text())
    after, gain = result["gold/score"], result["gold/gain_over_reference"]
    out = {"prompts": CONSTRAINT_PROMPTS, "n": result["gold/n"], "before_stage": before,
           "before": after - gain, "after": after, "gain": gain, "gain_se": result["gold/gain_over_reference_se"]}
    pair = "gold/constraints_held_out_pair"
    if pair in result:
        out["after_held_out_pairs"] = result[pair]
    return out


def main() -> int:
    align = [sys.executable, "-m", "alignment.cli"]
    started = time.time()
    run(align + ["data", str(OUT / "data")])
    # Extra arguments go to the pipeline (`make quickstart ARGS="--set seed=1"`).
    run(align + ["pipeline", "configs/smollm2/pipeline.yaml", "--set", f"output_dir={OUT}", *sys.argv[1:]])
    summary_path = OUT / "summary.json"
    stages = json.loads((OUT / "pipeline.json").read_text()).get("stages", {})
    before = "dpo" if "dpo" in stages else "sft"  # where configs/smollm2/pipeline.yaml's ppo stage starts
    if (OUT / "ppo" / "final").is_dir() and (OUT / before / "final").is_dir():
        run(align + ["eval", "--policy", str(OUT / "ppo" / "final"), "--reference", str(OUT / before / "final"),
                     "--prompts", CONSTRAINT_PROMPTS, "--num-prompts", str(CONSTRAINT_NUM),
                     "--out", str(OUT / "eval-constraints")])
        summary = json.loads(summary_path.read_text())
        summary["rl_constraints"] = rl_constraints(OUT / "eval-constraints" / "eval.json", before)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        c = summary["rl_constraints"]
        print(f"\nthe RL stage on {c['n']} held-out constraint prompts (greedy, paired): {before} {c['before']:.3f}"
              f" -> ppo {c['after']:.3f}, gain {c['gain']:+.3f} +- {c['gain_se']:.3f}")
    print(f"\nquickstart finished in {(time.time() - started) / 60:.1f} min; outputs in {OUT}/: "
          "summary.json (gold score after each stage, by family, RM accuracy, the RL stage's gain on held-out "
          "constraint prompts), report.html (open it in a browser), pipeline.json (every stage's held-out metrics "
          "and minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
