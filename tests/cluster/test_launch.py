"""The launchers' failure paths (FAILURES row 20: DeepSpeed's pdsh launcher returned 0 when a remote node failed,
and fell back to local GPUs on a hostfile it could not parse): a bad hostfile is an error before anything
starts, in `launch ssh` and in launch/deepspeed.sh alike; a node that exits non-zero makes the ssh fan-out exit
with its code and stops the other nodes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from alignment.cluster.launch import LaunchError, main, parse_hostfile, ssh_launch
from helpers import REPO, child_env


@pytest.mark.parametrize("content, message", [
    ("user@10.0.0.2 slots=2\n", r"hosts:1: cannot parse .*user@host is not allowed"),
    ("node-a slots=2\nnode-b\n", r"hosts:2: cannot parse 'node-b'"),
    ("node-a slots=0\n", r"hosts:1: slots must be >= 1"),
    ("node-a slots=2\nnode-a slots=2\n", r"hosts:2: host node-a listed twice"),
    ("node-a slots=2\nnode-b slots=4\n", r"every host needs the same slots"),
    ("# only a comment\n\n", r"hosts: no hosts"),
])
def test_a_hostfile_it_cannot_use_is_an_error_naming_the_line(tmp_path, content, message):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    with pytest.raises(LaunchError, match=message):
        parse_hostfile(hostfile)


def test_hostfile_comments_and_slots_are_read(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the two nodes\nnode-a slots=8  # head\n\nnode-b.cluster slots=8\n")
    assert [(h.name, h.slots) for h in parse_hostfile(hostfile)] == [("node-a", 8), ("node-b.cluster", 8)]


def test_launch_ssh_refuses_a_bad_or_missing_hostfile_before_starting_anything(tmp_path, capsys):
    bad = tmp_path / "hosts"
    bad.write_text("user@10.0.0.2 slots=2\n")
    marker = tmp_path / "started"
    shell = f"bash -c 'touch {marker}' --"  # would run on any node the launcher started
    assert main(["ssh", "--hostfile", str(bad), "--remote-shell", shell, "--", "sft", "x.yaml"]) == 2
    assert main(["ssh", "--hostfile", str(tmp_path / "missing"), "--remote-shell", shell, "--", "sft", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "user@host is not allowed" in err and "hostfile not found" in err
    assert not marker.exists(), "no node was started"


def test_a_failing_node_fails_the_launch_and_stops_the_others(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    sleeper = ["bash", "-c", f"echo $$ > {pid_file}; exec sleep 60", "node-b"]
    failing = ["bash", "-c", f"while [ ! -s {pid_file} ]; do sleep 0.05; done; exit 3", "node-a"]
    started = time.time()
    assert ssh_launch([failing, sleeper], grace=5.0) == 3
    assert time.time() - started < 30
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the other node's command is gone (stdin closed, then killed after the grace)


def test_every_node_succeeding_is_success():
    assert ssh_launch([["true", "node-a"], ["true", "node-b"]], grace=1.0) == 0


def test_deepspeed_sh_refuses_a_hostfile_deepspeed_would_fall_back_on(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("user@10.0.0.2 slots=2\n")
    proc = subprocess.run(["bash", "launch/deepspeed.sh", "--hostfile", str(bad), "sft", "configs/tiny/sft.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(child_env(), PY=sys.executable))
    assert proc.returncode != 0
    assert "user@host is not allowed" in proc.stderr
    assert "deepspeed.launcher" not in proc.stderr and "Running on" not in proc.stderr + proc.stdout
