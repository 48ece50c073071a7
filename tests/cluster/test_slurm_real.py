"""launch/slurm.sbatch under a real SLURM: Debian's slurm-wlm, one controller and one node daemon on this
machine (loopback, ports picked free), munge for authentication. The setup installs what is missing
(apt-get, as root: CI is root), like the browser tests; where it cannot, the test is skipped and says why.

test_slurm.py checks the script against stand-ins for srun and scontrol with two nodes; this one submits it with
`sbatch` for real (one node: a single machine runs one slurmd), so the job's environment, srun's task
placement and the exit code are SLURM's own.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from helpers import REPO, align_cache, child_env, free_port, read_metrics  # noqa: F401

pytestmark = pytest.mark.slow

PACKAGES = ["slurm-wlm", "munge"]


def _ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and this user cannot apt-get install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=900, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, timeout=1500, env=env,
                   capture_output=True)


def _wait(what: str, ok, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ok():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s")


@pytest.fixture
def real_slurm(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a local SLURM controller and node daemon need root here")
    _ensure_installed()
    root = tmp_path / "slurm"
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True)
    # munge: our own daemon and socket, so a system one (or none) makes no difference
    munge_socket = root / "munge" / "munge.socket"
    shutil.chown(root / "munge", "munge", "munge")
    munged = subprocess.run(["/usr/sbin/munged", "--force", f"--socket={munge_socket}",
                             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                             f"--seed-file={root / 'munge' / 'seed'}"], capture_output=True, text=True, timeout=30)
    assert munged.returncode == 0, munged.stderr
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=aligntest", f"SlurmctldHost={node}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={munge_socket}", "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "ReturnToService=2", "MpiDefault=none",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmdSpoolDir={root / 'spool'}", f"StateSaveLocation={root / 'state'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = child_env({"SLURM_CONF": str(conf)})
    pids = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            started = subprocess.run([f"/usr/sbin/{daemon}", "-c"], env=env, capture_output=True, text=True, timeout=60)
            assert started.returncode == 0, f"{daemon}: {started.stderr}"
            pid_file = root / f"{daemon}.pid"
            # the daemon creates its pid file before it writes the pid: wait for the number, not the file
            _wait(f"{daemon}'s pid file", lambda: pid_file.exists() and pid_file.read_text().split(), 30)
            pids.append(int(pid_file.read_text().split()[0]))
        _wait("the node", lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                                 text=True).stdout.strip() == "idle")
        yield env, node, root
    finally:
        munged_pid = root / "munge" / "munged.pid"
        for pid in pids + ([int(munged_pid.read_text())] if munged_pid.exists() else []):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass


def test_sbatch_runs_a_tiny_stage_through_slurm_sbatch(real_slurm, tmp_path, align_cache):
    env, node, root = real_slurm
    out, log = tmp_path / "sft", tmp_path / "job.out"
    env = dict(env, ALIGN_CACHE=str(align_cache), GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", f"--output={log}", "--chdir", str(REPO), "launch/slurm.sbatch",
         "sft", "configs/tiny/sft.yaml", "--set", f"output_dir={out}", "--set", "train.max_steps=3",
         "--set", "logging.progress_bar=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    job_log = log.read_text() if log.exists() else "(no job output)"
    assert proc.returncode == 0, proc.stdout + proc.stderr + job_log + (root / "log" / "slurmd.log").read_text()[-2000:]
    assert f"node ranks ok: {{0: '{node}'}}" in job_log, job_log
    assert [row["step"] for row in read_metrics(out) if "loss" in row] == [1, 2, 3]
    assert (out / "final" / "config.json").exists()


def test_usr1_under_slurm_checkpoints_ends_the_job_with_75_and_resume_finishes(real_slurm, tmp_path, align_cache):
    """SLURM's --signal=USR1@T (here scancel --signal=USR1, the same delivery) reaches every process of the step:
    torchrun ignores it (launch/node.sh), the ranks checkpoint at the next step boundary and exit 75, and
    slurm.sbatch turns torchrun's 1 back into 75; the same job with --resume runs to the end."""
    env, node, root = real_slurm
    out = tmp_path / "sft"
    env = dict(env, ALIGN_CACHE=str(align_cache), GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    stage = ["launch/slurm.sbatch", "sft", "configs/tiny/sft.yaml", "--set", f"output_dir={out}",
             "--set", "train.max_steps=100", "--set", "train.save_interval=0", "--set", "logging.progress_bar=false"]
    submit = ["sbatch", "--nodes=1", "--chdir", str(REPO)]
    job = subprocess.run(submit + ["--parsable", f"--output={tmp_path / 'first.out'}"] + stage, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip().split(";")[0]
    trained = lambda: [r["step"] for r in read_metrics(out) if "loss" in r] if (out / "metrics.jsonl").exists() else []
    _wait("step 3", lambda: len(trained()) >= 3, timeout=300)
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
    _wait("the job's end", lambda: not subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                                     text=True).stdout.strip(), timeout=180)
    state = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    first = (tmp_path / "first.out").read_text()
    assert "ExitCode=75:0" in state, state + first
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+)", first).group(1))
    assert 3 <= stopped < 100 and trained()[-1] == stopped
    assert (out / "checkpoints" / f"step-{stopped:08d}").is_dir()
    assert not list(REPO.glob(".align-stopped-*")), "the marker is removed"

    resumed = subprocess.run(submit + ["--wait", f"--output={tmp_path / 'second.out'}"] + stage + ["--resume"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr + (tmp_path / "second.out").read_text()
    assert trained() == list(range(1, 101))  # every step once: stopped at `stopped`, continued from it
    assert (out / "final" / "config.json").exists()
