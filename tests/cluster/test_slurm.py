"""launch/slurm.sbatch against what srun would give it: a job of two nodes, one task each.

`srun` and `scontrol` are stand-ins on PATH that do what SLURM does for this script: scontrol
lists the allocation's hosts; srun runs its command once per node, the tasks in parallel, each
with that node's SLURM_NODEID / SLURM_PROCID / SLURMD_NODENAME (so a variable the script
expands on the head node instead of inside the task shows up as two tasks with one rank). The
project's python is replaced by a recorder for the torchrun call only: what each node would
start, with its environment, is written down instead of run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, child_env

SRUN = r"""#!/usr/bin/env bash
# srun --ntasks-per-node=1 [--kill-on-bad-exit=1] CMD...: CMD once per node of the allocation, in parallel.
while [[ "$1" == --* ]]; do shift; done
hosts=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
pids=()
for i in "${!hosts[@]}"; do
  SLURM_NODEID=${FAKE_NODEID:-$i} SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=${hosts[$i]} \
    FAKE_HOSTNAME=${hosts[$i]} "$@" &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
"""

SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
echo "${FAKE_HOSTS// /$'\\n'}"
"""

HOSTNAME = """#!/usr/bin/env bash
echo "${FAKE_HOSTNAME:-head}"
"""

RECORDER = r"""#!/usr/bin/env bash
# The project's python, except that the torchrun call of launch/node.sh is recorded, not run.
if [[ "$1 $2" == "-m torch.distributed.run" ]]; then
  exec "$REAL_PYTHON" -c 'import json, os, sys
keys = ("NODE_RANK", "NNODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "SLURMD_NODENAME")
record = {"argv": sys.argv[3:], "env": {k: os.environ.get(k) for k in keys}}
with open(os.path.join(os.environ["RECORD_DIR"], os.environ["SLURMD_NODENAME"] + ".json"), "w") as f:
    json.dump(record, f)' "$@"
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL), ("hostname", HOSTNAME), ("python", RECORDER)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    env = child_env({
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "REAL_PYTHON": sys.executable,
        "PY": str(bin_dir / "python"), "RECORD_DIR": str(records), "FAKE_HOSTS": "gpu-a gpu-b",
        "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO), "MASTER_PORT": "29777",
    })
    return env, records


STAGE = ["sft", "configs/smollm2/sft.yaml", "--set", "output_dir=/tmp/with space/run"]


def test_every_node_starts_node_sh_with_its_own_rank(fake_slurm):
    env, records = fake_slurm
    proc = subprocess.run(["bash", "launch/slurm.sbatch", *STAGE], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "node ranks ok: {0: 'gpu-a', 1: 'gpu-b'}" in proc.stdout
    seen = {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}
    assert sorted(seen) == ["gpu-a", "gpu-b"]
    for rank, host in enumerate(["gpu-a", "gpu-b"]):
        argv, node_env = seen[host]["argv"], seen[host]["env"]
        assert node_env["NODE_RANK"] == str(rank) and node_env["NNODES"] == "2"
        assert node_env["MASTER_ADDR"] == "gpu-a" and node_env["MASTER_PORT"] == "29777"
        assert argv[:5] == ["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=8", "--master_addr=gpu-a",
                            "--master_port=29777"]
        assert argv[5:] == ["-m", "alignment.cli", *STAGE]  # the stage's arguments, spaces and all


def test_a_rank_expanded_on_the_head_node_is_refused_before_training(fake_slurm):
    env, records = fake_slurm
    env = dict(env, FAKE_NODEID="0")  # every task sees node id 0: what `"$SLURM_NODEID"` in double quotes gives
    proc = subprocess.run(["bash", "launch/slurm.sbatch", *STAGE], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"node rank 0 claimed by both gpu-[ab] and gpu-[ab]: the rank was expanded on the head node",
                     proc.stderr), proc.stderr
    assert not list(records.glob("*.json")), "nothing may start"


def test_dry_run_prints_each_nodes_exact_command(fake_slurm):
    env, records = fake_slurm
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "--dry-run", *STAGE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "# node 0: gpu-a" and lines[2] == "# node 1: gpu-b"
    for rank, line in ((0, lines[1]), (1, lines[3])):
        argv = shlex.split(line)
        assert argv[1:3] == ["-m", "torch.distributed.run"]
        assert argv[3:8] == ["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=8", "--master_addr=gpu-a",
                             "--master_port=29777"]
        assert argv[8:] == ["-m", "alignment.cli", *STAGE]
    assert not list(records.glob("*.json"))
