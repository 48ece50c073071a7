"""`align doctor`: a preflight of the job a launcher started, before a long run finds the problem for you.

Every rank reports its host, Python and package versions, accelerators and its slot; rank 0 compares
them. Then a timed all-reduce (bus bandwidth over the job's backend and transport) and a shared-
filesystem check of the output directory (each rank writes a file, every rank reads every file).
Exit 0 when all is consistent; 1 with every problem listed; 2 for a hostfile that cannot be read
(never a silent single-node run instead).

    align doctor --nproc 2 [--output-dir runs/doctor] [--hostfile hosts] [--size-mb 64]
    deepspeed --hostfile hosts --module alignment.cli doctor ...   (or torchrun / srun, as for any stage)
"""

from __future__ import annotations

import os
import platform
import secrets
import socket
import time
from pathlib import Path

from alignment.core.config import DeepSpeedConfig
from alignment.core.distributed import Distributed

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "trl")


class HostfileError(Exception):
    pass


def read_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed's hostfile: `host slots=N` per line, # comments; an error names the file and line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise HostfileError(f"hostfile {path}: cannot be read ({exc.strerror})") from None
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise HostfileError(f"hostfile {path}:{n}: expected 'HOST slots=N', got {raw!r}")
        if parts[0] in hosts:
            raise HostfileError(f"hostfile {path}:{n}: host {parts[0]} listed twice")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise HostfileError(f"hostfile {path}: no hosts")
    return hosts


def rank_facts() -> dict:
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    fake = os.environ.get("ALIGN_DEBUG_DOCTOR_VERSION")  # tests: "RANK:PACKAGE=VERSION" on one rank
    if fake and fake.split(":")[0] == os.environ.get("RANK"):
        package, version = fake.split(":", 1)[1].split("=")
        versions[package] = version
    names = {socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0]}
    try:
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return {"rank": int(os.environ.get("RANK", 0)), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "host": socket.gethostname(), "names": sorted(names), "versions": versions, "cuda": torch.cuda.is_available(),
            "gpus": torch.cuda.device_count()}


def allreduce_bandwidth(dist_, size_mb: int, iterations: int = 5) -> dict:
    """Bus bandwidth of an all-reduce of `size_mb` MiB (nccl-tests' convention: algbw x 2(n-1)/n)."""
    import torch
    import torch.distributed as tdist

    n = dist_.world_size
    tensor = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32, device=dist_.device)
    tdist.all_reduce(tensor)  # warm-up: connections are made here
    correct = bool((tensor == n).all())  # a sum of ones: exact in float32 for any world size
    dist_.barrier()
    started = time.perf_counter()
    for _ in range(iterations):
        tdist.all_reduce(tensor)
    if dist_.on_gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / iterations
    algbw = size_mb / 1024 / seconds
    return {"size_mb": size_mb, "seconds": seconds, "algbw_gb_s": algbw,
            "busbw_gb_s": algbw * 2 * (n - 1) / n if n > 1 else algbw, "correct": correct}


def shared_filesystem(dist_, output_dir: Path) -> dict:
    probe = output_dir / ".doctor"
    probe.mkdir(parents=True, exist_ok=True)
    nonce = dist_.broadcast_object(secrets.token_hex(8))
    (probe / f"rank-{dist_.rank}").write_text(f"{nonce}:{dist_.rank}")
    dist_.barrier()
    missing = [r for r in range(dist_.world_size)
               if not (probe / f"rank-{r}").is_file() or (probe / f"rank-{r}").read_text() != f"{nonce}:{r}"]
    everyone = dist_.gather_objects(missing)
    dist_.barrier()
    (probe / f"rank-{dist_.rank}").unlink(missing_ok=True)
    return {"path": str(output_dir), "unseen": {r: m for r, m in enumerate(everyone) if m}}


def main(args) -> int:

    dist_ = Distributed(DeepSpeedConfig())
    import torch.distributed as tdist

    # The launching process checked the hostfile; here only rank 0 reads it (it may exist on one node only).
    hosts = None
    if args.hostfile and dist_.is_main:
        try:
            hosts = read_hostfile(args.hostfile)
        except HostfileError as exc:
            hosts = exc

    facts = dist_.gather_objects(rank_facts())
    bandwidth = allreduce_bandwidth(dist_, args.size_mb)
    fs = shared_filesystem(dist_, Path(args.output_dir))
    problems: list[str] = []
    if dist_.is_main:
        reference = facts[0]["versions"]
        for f in facts[1:]:
            for name, version in f["versions"].items():
                if version != reference[name]:
                    problems.append(f"rank {f['rank']} ({f['host']}) has {name} {version}, rank 0 has {reference[name]}")
        per_host: dict[str, list[dict]] = {}
        for f in facts:
            per_host.setdefault(f["host"], []).append(f)
        for host, ranks in per_host.items():
            if ranks[0]["cuda"] and ranks[0]["gpus"] < len(ranks):
                problems.append(f"{host}: {len(ranks)} ranks but {ranks[0]['gpus']} GPUs")
        if isinstance(hosts, HostfileError):
            problems.append(str(hosts))
            hosts = None
        if hosts is not None:  # a hostfile line may name a host by short name, FQDN or address
            alias = {name: host for host, ranks in per_host.items() for name in ranks[0]["names"]}
            hosts = {alias.get(h, h): slots for h, slots in hosts.items()}
            for host in hosts:
                if host not in per_host:
                    problems.append(f"hostfile host {host} started no rank (this job runs on: "
                                    f"{', '.join(per_host)})")
                elif hosts[host] != len(per_host[host]):
                    problems.append(f"{host}: hostfile says slots={hosts[host]}, {len(per_host[host])} ranks "
                                    "started there")
        if not bandwidth["correct"]:
            problems.append("the all-reduce returned a wrong sum")
        for rank, unseen in fs["unseen"].items():
            problems.append(f"rank {rank} cannot see the files of ranks {unseen} under {fs['path']}: the output "
                            "directory is not on a filesystem every node shares")
        print(f"align doctor: {dist_.world_size} ranks on {len(per_host)} host(s), backend {tdist.get_backend()}, "
              f"master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        for f in facts:
            v = f["versions"]
            print(f"  rank {f['rank']} {f['host']} local rank {f['local_rank']} of {len(per_host[f['host']])} "
                  f"python {v['python']} torch {v['torch']} deepspeed {v['deepspeed']} transformers "
                  f"{v['transformers']} | accelerators: {f['gpus'] if f['cuda'] else 'none (CPU)'}")
        print(f"  all-reduce {bandwidth['size_mb']} MiB: {bandwidth['seconds'] * 1000:.1f} ms, bus bandwidth "
              f"{bandwidth['busbw_gb_s']:.2f} GB/s ({'correct' if bandwidth['correct'] else 'WRONG'} sum)")
        print(f"  shared filesystem at {fs['path']}: {'every rank sees every file' if not fs['unseen'] else 'NO'}")
        for p in problems:
            print(f"  PROBLEM: {p}")
        print("doctor: all consistent" if not problems else f"doctor: {len(problems)} problem(s)")
    failed = dist_.broadcast_object(bool(problems))
    dist_.close()
    return 1 if failed else 0
