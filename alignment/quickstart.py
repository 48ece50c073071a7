"""`make quickstart`: the built-in pipeline end to end on SmolLM2-135M, on CPU.

Step 1 writes the built-in task's data; step 2 runs SFT with a gold score before
and after on held-out prompts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    align = [sys.executable, "-m", "alignment.cli"]
    started = time.time()
    os.makedirs("runs/quickstart", exist_ok=True)
    run(align + ["data", "runs/quickstart/data"])
    run(align + ["sft", "configs/smollm2/sft.yaml", "--set", "output_dir=runs/quickstart/sft"])
    print(f"quickstart finished in {(time.time() - started) / 60:.1f} min; see runs/quickstart/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
