"""Multi-node launching: hostfiles, SLURM rank checks, and an ssh fan-out that fails loudly.

One canonical per-node command (launch/node.sh: torchrun running `align STAGE RECIPE`)
is reused by every wrapper:
- `python -m alignment.cluster.launch ssh --hostfile H -- STAGE RECIPE [...]` starts it on every
  host over ssh, and exits non-zero as soon as any node fails (stopping the others);
  a hostfile it cannot parse is an error before anything starts (never a silent
  fallback to local GPUs).
- launch/slurm.sbatch checks with `python -m alignment.cluster.launch check-ranks` that every
  node got a distinct rank (SLURM_NODEID expanded inside each task, not on the head
  node) before starting the job with srun.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9._-]*)\s+slots=(?P<slots>\d+)\s*$")


class LaunchError(ValueError):
    pass


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(path: str | Path) -> list[Host]:
    """DeepSpeed-style hostfile: `hostname slots=N` per line, `#` comments. Strict."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile not found: {path}")
    hosts: list[Host] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if not match:
            hint = " (user@host is not allowed; set the user in ~/.ssh/config)" if "@" in line else ""
            raise LaunchError(f"{path}:{number}: cannot parse {raw!r}; expected 'hostname slots=N'{hint}")
        host = Host(match["host"], int(match["slots"]))
        if host.slots < 1:
            raise LaunchError(f"{path}:{number}: slots must be >= 1")
        if any(h.name == host.name for h in hosts):
            raise LaunchError(f"{path}:{number}: host {host.name} listed twice")
        hosts.append(host)
    if not hosts:
        raise LaunchError(f"{path}: no hosts")
    slots = {h.slots for h in hosts}
    if len(slots) != 1:
        raise LaunchError(f"{path}: every host needs the same slots for torchrun, got {sorted(slots)}")
    return hosts


def node_command(stage_args: list[str], node_rank: int, nnodes: int, nproc: int, master: str, port: int) -> list[str]:
    """The canonical per-node command: torchrun starting `align` with the node's rank."""
    return [
        "torchrun", f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc}",
        f"--master_addr={master}", f"--master_port={port}", "-m", "alignment.cli", *stage_args,
    ]


def check_node_ranks(lines: list[str], nnodes: int) -> dict[int, str]:
    """Rows `NODE_RANK HOSTNAME` from each node -> {rank: host}; refuses duplicates and gaps."""
    ranks: dict[int, str] = {}
    for line in lines:
        if not line.strip():
            continue
        rank_text, host = line.split(maxsplit=1)
        rank = int(rank_text)
        if rank in ranks:
            raise LaunchError(
                f"node rank {rank} claimed by both {ranks[rank]} and {host.strip()}: the rank was expanded on the "
                "head node instead of inside each task; refusing to start"
            )
        ranks[rank] = host.strip()
    if sorted(ranks) != list(range(nnodes)):
        raise LaunchError(f"expected node ranks 0..{nnodes - 1}, got {sorted(ranks)}")
    return ranks


def ssh_launch(hosts: list[Host], stage_args: list[str], port: int, remote_shell: list[str], workdir: str) -> int:
    """Start the node command on every host; return the first non-zero exit code (others are stopped)."""
    master = hosts[0].name
    procs = []
    for rank, host in enumerate(hosts):
        cmd = node_command(stage_args, rank, len(hosts), host.slots, master, port)
        remote = f"cd {shlex.quote(workdir)} && " + " ".join(shlex.quote(c) for c in cmd)
        procs.append(subprocess.Popen([*remote_shell, host.name, remote], start_new_session=True))
    code = 0
    while procs:
        for proc in list(procs):
            rc = proc.poll()
            if rc is None:
                continue
            procs.remove(proc)
            if rc != 0:
                code = rc
                for other in procs:  # one node failed: stop the rest instead of letting them hang
                    try:
                        os.killpg(other.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                for other in procs:
                    other.wait()
                procs = []
                break
        time.sleep(0.2)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.cluster.launch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ssh = sub.add_parser("ssh", help="run a stage on every host of a hostfile")
    ssh.add_argument("--hostfile", required=True)
    ssh.add_argument("--port", type=int, default=29500)
    ssh.add_argument("--workdir", default=os.getcwd())
    ssh.add_argument("--remote-shell", default=os.environ.get("ALIGN_REMOTE_SHELL", "ssh -o BatchMode=yes"),
                     help="command that runs a command on a host: '<shell> HOST CMD' (default: ssh)")
    ssh.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- STAGE RECIPE [--set ...]")
    check = sub.add_parser("check-ranks", help="verify 'NODE_RANK HOST' lines from every node")
    check.add_argument("file")
    check.add_argument("--nnodes", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "check-ranks":
            ranks = check_node_ranks(Path(args.file).read_text().splitlines(), args.nnodes)
            print(f"node ranks ok: {ranks}")
            return 0
        hosts = parse_hostfile(args.hostfile)
        stage_args = [a for a in args.stage_args if a != "--"]
        if not stage_args:
            raise LaunchError("nothing to run: pass -- STAGE RECIPE [...]")
        return ssh_launch(hosts, stage_args, args.port, shlex.split(args.remote_shell), args.workdir)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
