"""This process's place in the job: rank, world size, device, and the collectives the stages use.

Joins the job a launcher started (RANK / WORLD_SIZE / MASTER_ADDR from DeepSpeed's launcher,
torchrun or srun), or makes a one-process job when there is none. gloo on CPU, NCCL with CUDA,
and a collective timeout from the recipe, so a lost rank fails the job instead of hanging it.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from alignment.core.config import DeepSpeedConfig


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unlink_deepspeed_shm_buffer(rank: int) -> None:
    """Remove this rank's /dev/shm name of DeepSpeed's CPU all-reduce buffer.

    DeepSpeed's CPU comm op (ops/csrc/cpu/comm/shm.cpp) creates a 66 MB shared-memory
    buffer per rank at init_distributed and never unlinks it, so every CPU run used to
    leave its buffers in /dev/shm (RAM): 16 GB had piled up here before a benchmark was
    OOM-killed. Once all ranks have mapped each other's buffers (the barrier before this
    call), the names can go; the mappings stay valid until the processes exit.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def gloo_interface_toward(master_addr: str) -> tuple[str, str] | None:
    """(interface, local address) this host uses to reach `master_addr`, or None when it is loopback/unknown.

    gloo binds the address the host name resolves to unless GLOO_SOCKET_IFNAME says otherwise; on
    many clusters (and in containers) the host name resolves to 127.0.x.1, so every rank of a
    multi-node job advertises a loopback address, ranks on other nodes get "connection refused"
    and the job dies at init (FAILURES: multi-node gloo). The kernel's route to the master picks
    the right interface; a UDP connect sends nothing.
    """
    import psutil

    try:
        target = socket.gethostbyname(master_addr)
        if target.startswith("127."):
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            local = sock.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name, local
    return None


class Distributed:
    """Rank, world size and device of this process, and the collectives over all ranks."""

    def __init__(self, ds: DeepSpeedConfig):
        import deepspeed

        self.on_gpu = torch.cuda.is_available()
        if "WORLD_SIZE" not in os.environ:  # a plain single-process run
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = ds.backend if ds.backend != "auto" else ("nccl" if self.on_gpu else "gloo")
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.on_gpu:
            torch.cuda.set_device(self.local_rank)
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            found = gloo_interface_toward(os.environ.get("MASTER_ADDR", "127.0.0.1"))
            if found:
                os.environ["GLOO_SOCKET_IFNAME"] = found[0]
                print(f"[rank {os.environ.get('RANK', '?')}] gloo over {found[0]} ({found[1]}), the route to "
                      f"MASTER_ADDR {os.environ['MASTER_ADDR']} (set GLOO_SOCKET_IFNAME to choose)", flush=True)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=timedelta(minutes=ds.timeout_minutes))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device("cuda", self.local_rank) if self.on_gpu else torch.device("cpu")
        if not self.on_gpu:
            dist.barrier()  # by now every rank has mapped every rank's DeepSpeed shm buffer
            _unlink_deepspeed_shm_buffer(self.rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def global_sum(self, value: float | int | torch.Tensor) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(1).clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """All-reduce a dict of per-rank sums (one collective)."""
        keys = sorted(sums)
        tensor = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return dict(zip(keys, tensor.tolist()))

    def reduce_max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
