"""Multi-node launching: hostfiles, SLURM rank checks, and an ssh fan-out that fails loudly.

One canonical per-node command (launch/node.sh: torchrun running `align STAGE RECIPE`)
is reused by every wrapper:
- `python -m alignment.cluster.launch ssh --hostfile H -- STAGE RECIPE [...]` starts it on every
  host over ssh (from the project directory, with the project's python), under a guard that
  ends the node's ranks when the launcher goes away; it exits non-zero as soon as any node
  fails (stopping the others), and SIGTERM/SIGINT to it stops every node. A hostfile it
  cannot parse is an error before anything starts (never a silent fallback to local GPUs).
  `--dry-run` prints each node's command.
- launch/slurm.sbatch checks with `python -m alignment.cluster.launch check-ranks` that every
  node got a distinct rank (SLURM_NODEID expanded inside each task, not on the head
  node) before starting the job with srun.
"""

from __future__ import annotations

import argparse
import contextlib
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


PROJECT = Path(__file__).resolve().parents[2]
NODE_SH = "launch/node.sh"  # the canonical per-node command, relative to the project root


def node_env(node_rank: int, nnodes: int, nproc: int, master: str, port: int, python: str) -> dict[str, str]:
    """What launch/node.sh reads: this node's rank, the job's shape, the rendezvous, the project's python."""
    return {"NNODES": str(nnodes), "NODE_RANK": str(node_rank), "GPUS_PER_NODE": str(nproc),
            "MASTER_ADDR": master, "MASTER_PORT": str(port), "PY": python}


def node_command(stage_args: list[str], node_rank: int, nnodes: int, nproc: int, master: str, port: int,
                 workdir: str, python: str) -> str:
    """The shell command one node runs: launch/node.sh from the project, under a guard that ends every rank of
    the node when the launcher goes away (its stdin closes: the ssh connection dropped or was closed)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in node_env(node_rank, nnodes, nproc, master, port, python).items())
    guarded = [python, "-m", "alignment.cluster.launch", "guard", "--", NODE_SH, *stage_args]
    return f"cd {shlex.quote(workdir)} && {env} exec " + " ".join(shlex.quote(c) for c in guarded)


def guard(cmd: list[str], grace: float = 20.0) -> None:
    """Run `cmd` (a node's launcher and its ranks) in its own session; end the whole session when our stdin
    closes or we get SIGTERM/SIGHUP/SIGINT: SIGTERM first (the ranks checkpoint at the next step boundary,
    alignment.core.loop), SIGKILL after `grace` seconds. Exits with the command's exit code.

    Over ssh a remote process outlives a killed ssh client (no tty, no SIGHUP), so stopping the launcher used
    to leave every remote rank running; stdin EOF is the one signal that always arrives."""
    import threading

    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    stopping = threading.Event()

    def stop(reason: str) -> None:
        if stopping.is_set() or child.poll() is not None:
            return
        stopping.set()
        print(f"[node guard] {reason}: stopping this node's ranks", file=sys.stderr, flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

        def kill_later() -> None:
            if child.poll() is None:
                try:
                    child.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)

        threading.Thread(target=kill_later, daemon=True).start()

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        stop("the launcher's connection closed")

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop(f"got {signal.Signals(signum).name}"))
    threading.Thread(target=watch_stdin, daemon=True).start()
    code = child.wait()
    with contextlib.suppress(ProcessLookupError):  # a rank's helper left behind in the session
        os.killpg(child.pid, signal.SIGKILL)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if code >= 0 else 128 - code)  # not a normal exit: the stdin reader thread would block it


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


def ssh_commands(hosts: list[Host], stage_args: list[str], port: int, remote_shell: list[str], workdir: str,
                 python: str) -> list[list[str]]:
    """Per node: the local command that runs that node's guarded launch/node.sh on its host."""
    master = hosts[0].name
    return [[*remote_shell, host.name, node_command(stage_args, rank, len(hosts), host.slots, master, port, workdir,
                                                    python)]
            for rank, host in enumerate(hosts)]


def ssh_launch(commands: list[list[str]], grace: float = 30.0) -> int:
    """Start every node's command; return the first non-zero exit code, stopping the other nodes.

    Stopping a node closes its command's stdin: the remote guard then ends that node's ranks (SIGTERM,
    then SIGKILL). SIGTERM/SIGINT to this launcher stops every node the same way."""
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True) for cmd in commands]
    stop_requested: list[int] = []

    def on_signal(signum, frame):
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        running = list(procs)
        while running and not stop_requested:
            for proc in list(running):
                rc = proc.poll()
                if rc is None:
                    continue
                running.remove(proc)
                if rc != 0:
                    node = procs.index(proc)
                    print(f"error: node {node} ({commands[node][-2]}) exited with {rc}; stopping the other nodes",
                          file=sys.stderr, flush=True)
                    code = rc
                    running = []
                    break
            time.sleep(0.2)
        if stop_requested:
            code = 128 + stop_requested[0]
            print(f"launcher got {signal.Signals(stop_requested[0]).name}: stopping every node", file=sys.stderr,
                  flush=True)
    finally:
        _stop_all(procs, grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _stop_all(procs: list[subprocess.Popen], grace: float) -> None:
    for proc in procs:
        if proc.poll() is None and proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the remote guard stops that node's ranks
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.cluster.launch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ssh = sub.add_parser("ssh", help="run a stage on every host of a hostfile")
    ssh.add_argument("--hostfile", required=True)
    ssh.add_argument("--port", type=int, default=29500)
    ssh.add_argument("--workdir", default=os.getcwd())
    ssh.add_argument("--remote-shell", default=os.environ.get("ALIGN_REMOTE_SHELL", "ssh -o BatchMode=yes"),
                     help="command that runs a command on a host: '<shell> HOST CMD' (default: ssh)")
    ssh.add_argument("--python", default=None, help="the project's python on every node (default: this one, "
                     "sys.executable; the project's environment is expected at the same path on each node)")
    ssh.add_argument("--dry-run", action="store_true", help="print each node's command and exit")
    ssh.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- STAGE RECIPE [--set ...]")
    guard_cmd = sub.add_parser("guard", help="(run on a node) run a command, ending it when stdin closes")
    guard_cmd.add_argument("cmd", nargs=argparse.REMAINDER)
    check = sub.add_parser("check-ranks", help="verify 'NODE_RANK HOST' lines from every node")
    check.add_argument("file")
    check.add_argument("--nnodes", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "check-ranks":
            ranks = check_node_ranks(Path(args.file).read_text().splitlines(), args.nnodes)
            print(f"node ranks ok: {dict(sorted(ranks.items()))}")
            return 0
        if args.command == "guard":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise LaunchError("guard: nothing to run")
            guard(cmd)
        hosts = parse_hostfile(args.hostfile)
        stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args
        if not stage_args:
            raise LaunchError("nothing to run: pass -- STAGE RECIPE [...]")
        commands = ssh_commands(hosts, stage_args, args.port, shlex.split(args.remote_shell),
                                os.path.abspath(args.workdir), args.python or sys.executable)
        if args.dry_run:
            for rank, cmd in enumerate(commands):
                print(f"# node {rank}: {hosts[rank].name}, {hosts[rank].slots} slot(s)")
                print(" ".join(shlex.quote(c) for c in cmd))
            return 0
        return ssh_launch(commands)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
