"""Engine.release_optimizer_state: after training, Adam's moments are really freed (no tensor of the
optimizer state survives, DeepSpeed's wrappers included), the weights stay, and a further step refuses
instead of silently restarting Adam from zero moments."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, align_cache, child_env  # noqa: F401


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (0, "bf16"), (2, "bf16"), (3, "bf16")])
def test_release_frees_every_state_tensor(align_cache, zero_stage, precision):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "core" / "release_probe.py"), str(zero_stage),
                             precision], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["count"] >= 2 and facts["expected"] > 0  # the step made AdamW state to free
    assert facts["freed"] == facts["expected"]
    assert facts["alive"] == 0, f"{facts['alive']} of {facts['count']} state tensors still referenced"
    assert facts["weights_same"] and facts["step_refused"]
