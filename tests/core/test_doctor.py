"""`align doctor` on 2 local ranks: consistent job passes; a version mismatch on rank 1 and a hostfile whose
slots do not match fail with the problem named; an unreadable hostfile is an error before any rank starts."""

from __future__ import annotations

import pytest

from helpers import run_cli


@pytest.mark.slow
def test_doctor_two_ranks(tmp_path):
    ok = run_cli(["doctor", "--nproc", "2", "--output-dir", str(tmp_path / "out"), "--size-mb", "8"])
    assert ok.returncode == 0, ok.output[-3000:]
    assert "align doctor: 2 ranks on 1 host(s), backend gloo" in ok.output
    assert "(correct sum)" in ok.output and "every rank sees every file" in ok.output

    bad = run_cli(["doctor", "--nproc", "2", "--output-dir", str(tmp_path / "out"), "--size-mb", "8"],
                  env={"ALIGN_DEBUG_DOCTOR_VERSION": "1:torch=0.0.1"})
    assert bad.returncode == 1, bad.output[-3000:]
    assert "PROBLEM: rank 1 (" in bad.output and "has torch 0.0.1, rank 0 has" in bad.output

    import socket

    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{socket.gethostname()} slots=4\nnode-b slots=2\n")
    slots = run_cli(["doctor", "--nproc", "2", "--output-dir", str(tmp_path / "out"), "--size-mb", "8",
                     "--hostfile", str(hostfile)])
    assert slots.returncode == 1
    assert "hostfile says slots=4, 2 ranks started there" in slots.output
    assert "hostfile host node-b started no rank" in slots.output


def test_unreadable_or_malformed_hostfile_is_an_error(tmp_path):
    missing = run_cli(["doctor", "--nproc", "2", "--hostfile", str(tmp_path / "nope")])
    assert missing.returncode == 2 and "cannot be read" in missing.output
    bad = tmp_path / "hosts"
    bad.write_text("node-a slots=2\nnode-b 4\n")
    malformed = run_cli(["doctor", "--hostfile", str(bad)])
    assert malformed.returncode == 2 and f"hostfile {bad}:2: expected 'HOST slots=N'" in malformed.output
