"""Two nodes on one machine: network namespaces made here, one rank per node, a tiny ZeRO-3 SFT.

Each namespace has its own address on a veth link this module creates (10.231.<n>.1 and .2), so
the two "nodes" reach each other only over that link, as two hosts do. Where namespaces cannot
be made (not root, no CAP_NET_ADMIN), both nodes run on the host's loopback instead, and the
module says so in its output (the tests then check the launch paths, not the network).

Checked for each way users launch: launch/node.sh (torchrun) on each node, DeepSpeed's own
launcher (launch/deepspeed.sh --no_ssh, one node of a hostfile each), and the ssh fan-out
(alignment.cluster.launch, with ssh replaced by `ip netns exec` through the same code path):
- the loss curve equals a single-node 2-rank run of the same world size (rel. 1e-5: the
  single-node reduction goes through DeepSpeed's shared-memory all-reduce, in another order);
- killing node 1's processes mid-run ends node 0 non-zero within 60 s, with a message naming
  the lost peer;
- stopping the ssh launcher ends every rank on every node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, align_cache, child_env, step_metrics  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 6
RUN = ["sft", "configs/tiny/sft.yaml", "--set", "deepspeed.zero_stage=3", "--set", "logging.progress_bar=false",
       "--set", "train.eval_interval=0", "--set", "train.save_interval=0"]
LONG = ["--set", "train.max_steps=100000", "--set", "train.num_epochs=1000"]  # runs until killed
NETNS_SHELL = Path(__file__).with_name("netns_shell.sh")


class Nodes:
    """Two nodes: the command prefix that runs a process on node i, its address, and how to kill it."""

    def __init__(self, tag: str):
        self.tag = tag
        self.names = [f"al{tag}n0", f"al{tag}n1"]
        subnet = 200 + os.getpid() % 50
        self.addrs = [f"10.231.{subnet}.1", f"10.231.{subnet}.2"]
        self.netns = self._create()
        if not self.netns:
            self.addrs = ["127.0.0.1", "127.0.0.1"]
            print("\nNOTE: network namespaces unavailable here: the two nodes run on loopback", flush=True)

    def _create(self) -> bool:
        if shutil.which("ip") is None or os.geteuid() != 0:
            return False
        a, b = self.names
        steps = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
                 ["ip", "link", "add", f"{a}v", "type", "veth", "peer", "name", f"{b}v"],
                 ["ip", "link", "set", f"{a}v", "netns", a], ["ip", "link", "set", f"{b}v", "netns", b]]
        for ns, addr in zip(self.names, self.addrs):
            steps += [["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", f"{ns}v"],
                      ["ip", "-n", ns, "link", "set", f"{ns}v", "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
        for cmd in steps:
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                self.remove()
                return False
        return True

    def remove(self) -> None:
        for ns in self.names:  # deleting a namespace deletes its end of the veth link, and so the link
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]] if self.netns else []

    def pids(self, i: int) -> list[int]:
        if not self.netns:
            return []
        out = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self, i: int, proc: subprocess.Popen) -> None:
        """SIGKILL every process of node i (as a machine that loses power, minus the network: the kernel
        still closes its sockets)."""
        for pid in self.pids(i):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def nodes():
    n = Nodes(f"{os.getpid() % 10000}")
    yield n
    n.remove()


_ports = iter(range(29600 + os.getpid() % 200 * 10, 29600 + os.getpid() % 200 * 10 + 10))


def start(nodes: Nodes, i: int, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([*nodes.prefix(i), *cmd], cwd=REPO, env=child_env(env), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise AssertionError(f"a node did not finish within {timeout}s")
    return codes


def node_sh(nodes: Nodes, i: int, port: int, out: Path, extra: list[str]) -> list[str]:
    env = [f"NNODES=2", f"NODE_RANK={i}", "GPUS_PER_NODE=1", f"MASTER_ADDR={nodes.addrs[0]}", f"MASTER_PORT={port}",
           f"PY={sys.executable}"]
    return ["env", *env, "launch/node.sh", *RUN, "--set", f"output_dir={out}", *extra]


def deepspeed_sh(nodes: Nodes, i: int, port: int, out: Path, extra: list[str], hostfile: Path) -> list[str]:
    return ["env", f"PY={sys.executable}", "launch/deepspeed.sh", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(i), "--master_addr", nodes.addrs[0], "--master_port", str(port),
            *RUN, "--set", f"output_dir={out}", *extra]


def launcher_cmd(kind: str, nodes: Nodes, i: int, port: int, out: Path, extra: list[str], tmp: Path) -> list[str]:
    if kind == "node.sh":
        return node_sh(nodes, i, port, out, extra)
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    return deepspeed_sh(nodes, i, port, out, extra, hostfile)


def losses(out: Path) -> list[float]:
    return [r["loss"] for _, r in sorted(step_metrics(out).items())]


@pytest.fixture(scope="module")
def single_node_curve(tmp_path_factory, align_cache):
    """The reference: one node, two ranks, launch/node.sh, same recipe and world size."""
    out = tmp_path_factory.mktemp("single") / "run"
    cmd = ["env", "NNODES=1", "GPUS_PER_NODE=2", f"MASTER_PORT={next(_ports)}", f"PY={sys.executable}",
           "launch/node.sh", *RUN, "--set", f"output_dir={out}", "--set", f"train.max_steps={STEPS}"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curve = losses(out)
    assert len(curve) == STEPS
    return curve


def assert_same_curve(curve: list[float], reference: list[float]) -> None:
    assert len(curve) == len(reference)
    for step, (a, b) in enumerate(zip(curve, reference), start=1):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}: {a} vs single-node {b}"


@pytest.mark.parametrize("kind", ["node.sh", "deepspeed.sh"])
def test_two_nodes_give_the_single_node_loss_curve(kind, nodes, single_node_curve, tmp_path, align_cache):
    out, port = tmp_path / "run", next(_ports)
    started = time.time()
    procs = [start(nodes, i, launcher_cmd(kind, nodes, i, port, out, ["--set", f"train.max_steps={STEPS}"],
                                          tmp_path), tmp_path / f"node{i}.log") for i in (0, 1)]
    codes = wait_all(procs, 300)
    logs = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert_same_curve(losses(out), single_node_curve)
    if nodes.netns:  # each node's rank went over its own link, not loopback
        for i in (0, 1):
            assert f"({nodes.addrs[i]})" in logs[i], logs[i][-2000:]
    print(f"{kind}: two nodes ({'netns' if nodes.netns else 'loopback'}), {STEPS} steps in "
          f"{time.time() - started:.1f}s; loss curve = single-node 2-rank run")


def wait_for_steps(out: Path, n: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and sum(1 for line in path.read_text().splitlines() if '"loss"' in line) >= n:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a node exited before training got going")
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} steps logged in {timeout}s")


@pytest.mark.parametrize("kind", ["node.sh", "deepspeed.sh"])
def test_killing_node_1_ends_node_0_naming_the_lost_peer(kind, nodes, tmp_path, align_cache):
    out, port = tmp_path / "run", next(_ports)
    procs = [start(nodes, i, launcher_cmd(kind, nodes, i, port, out, LONG, tmp_path), tmp_path / f"node{i}.log")
             for i in (0, 1)]
    try:
        wait_for_steps(out, 3, procs)
        killed = time.time()
        nodes.kill(1, procs[1])
        code = procs[0].wait(timeout=60)
        took = time.time() - killed
    finally:
        for i, p in enumerate(procs):
            nodes.kill(i, p)
    log = (tmp_path / "node0.log").read_text()
    assert code != 0, log[-3000:]
    # gloo names the peer whose connection broke: node 1's address (on loopback: the lost rank's error line)
    named = f"the peer at {nodes.addrs[1]}" if nodes.netns else "[rank 0]"
    assert "lost contact with another rank" in log and named in log, log[-3000:]
    print(f"{kind}: node 1 killed; node 0 exited {code} after {took:.1f}s")


def test_ssh_launcher_runs_node_sh_everywhere_and_stopping_it_ends_every_rank(nodes, single_node_curve, tmp_path,
                                                                              align_cache):
    if not nodes.netns:
        pytest.skip("needs network namespaces: both hosts of the hostfile would be this one")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{nodes.addrs[0]} slots=1\n{nodes.addrs[1]} slots=1\n")
    env = {"ALIGN_TEST_NETNS": f"{nodes.addrs[0]}={nodes.names[0]},{nodes.addrs[1]}={nodes.names[1]}"}

    def launch(out: Path, extra: list[str], log: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "alignment.cluster.launch", "ssh", "--hostfile", str(hostfile), "--port",
               str(next(_ports)), "--remote-shell", str(NETNS_SHELL), "--", *RUN, "--set", f"output_dir={out}",
               *extra]
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=open(tmp_path / log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    # 1. A whole run: the same curve as one node with two ranks.
    proc = launch(tmp_path / "done", ["--set", f"train.max_steps={STEPS}"], "done.log")
    assert wait_all([proc], 300) == [0], (tmp_path / "done.log").read_text()[-3000:]
    assert_same_curve(losses(tmp_path / "done"), single_node_curve)

    # 2. SIGTERM to the launcher mid-run: no rank survives on either node.
    proc = launch(tmp_path / "stop", LONG, "stop.log")
    try:
        wait_for_steps(tmp_path / "stop", 3, [proc])
        assert nodes.pids(0) and nodes.pids(1)
        stopped = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
        while (nodes.pids(0) or nodes.pids(1)) and time.time() - stopped < 60:
            time.sleep(0.2)
        left = nodes.pids(0) + nodes.pids(1)
    finally:
        for i in (0, 1):
            nodes.kill(i, proc)
    log = (tmp_path / "stop.log").read_text()
    assert code != 0, log[-3000:]
    assert not left, f"processes left on the nodes: {left}\n{log[-3000:]}"
    assert "stopping this node's ranks" in log
    print(f"ssh launcher stopped: every rank on both nodes gone after {time.time() - stopped:.1f}s")


def test_ssh_dry_run_prints_node_sh_for_every_node(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    proc = subprocess.run([sys.executable, "-m", "alignment.cluster.launch", "ssh", "--hostfile", str(hostfile),
                           "--dry-run", "--", "sft", "configs/smollm2/sft.yaml"], cwd=REPO, capture_output=True,
                          text=True, env=child_env())
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 2
    for rank, (host, line) in enumerate(zip(["gpu-a", "gpu-b"], lines)):
        assert line.startswith(f"ssh -o BatchMode=yes {host} ")
        for part in (f"cd {REPO}", "NNODES=2", f"NODE_RANK={rank}", "GPUS_PER_NODE=8", "MASTER_ADDR=gpu-a",
                     f"PY={sys.executable}", "alignment.cluster.launch guard -- launch/node.sh sft "
                     "configs/smollm2/sft.yaml"):
            assert part in line, line
