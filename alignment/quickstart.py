"""`make quickstart`: the built-in pipeline end to end on SmolLM2-135M-Instruct, on CPU.

Step 1 writes the built-in task's data files (SFT demonstrations, preference pairs,
prompt sets with gold specs) so you can look at them. Step 2 runs the pipeline of
configs/smollm2/pipeline.yaml: SFT -> reward model -> DPO -> GRPO, ending with the gold
score on held-out prompts after each stage and the reward model's accuracy
(runs/quickstart/summary.json) and runs/quickstart/report.html.
"""

from __future__ import annotations

import subprocess
import sys
import time


def run(cmd: list[str]) -> None:
    print("+ align", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    align = [sys.executable, "-m", "alignment.cli"]
    started = time.time()
    run(align + ["data", "runs/quickstart/data"])
    # Extra arguments go to the pipeline (`make quickstart ARGS="--set seed=1"`).
    run(align + ["pipeline", "configs/smollm2/pipeline.yaml", "--set", "output_dir=runs/quickstart", *sys.argv[1:]])
    print(f"\nquickstart finished in {(time.time() - started) / 60:.1f} min; outputs in runs/quickstart/: "
          "summary.json (gold score after each stage, RM accuracy), report.html (open it in a browser), "
          "pipeline.json (every stage's held-out metrics and minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
