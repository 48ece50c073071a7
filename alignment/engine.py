"""The DeepSpeed engine layer: the one place that imports deepspeed.

Every stage gets an :class:`Engine` and calls it; no stage touches deepspeed.
It owns distributed init, the DeepSpeed config built from the recipe, wrapping
trainable models (optimizer, LR schedule, ZeRO 0-3, offload, precision, clipping,
accumulation), frozen inference models (reference and reward models, sharded
under ZeRO-3 with no optimizer state), cross-rank reductions, atomic checkpoints
with RNG and data position, and gathering full weights for export.

Loss normalisation. A stage hands :meth:`Engine.backward` this rank's *sum* of
per-item losses divided by the item count of the whole optimizer step across all
ranks (:meth:`Engine.global_sum`). The engine undoes DeepSpeed's averaging over
ranks, so the gradient is exactly that of the global mean, whatever the split
into ranks and micro-batches (1 rank x 4 micro == 2 ranks x 2 micro).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

# DeepSpeed trap seen here: torch._dynamo must be imported before any zero.Init.
import torch._dynamo  # noqa: F401

from alignment.config import BatchLayout, DeepSpeedConfig, TrainConfig, batch_layout

CHECKPOINT_DONE = "checkpoint.json"


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


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float):
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if schedule == "linear":
            shape = 1.0 - progress
        else:  # cosine
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return fn


def build_deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, layout: BatchLayout, on_gpu: bool) -> dict:
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_bucket_size=5e7)
    if ds.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=1e4,
            stage3_prefetch_bucket_size=5e7,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if train.max_grad_norm > 0:
        config["gradient_clipping"] = train.max_grad_norm
    if ds.offload_optimizer:
        # ZeRO-Offload wants DeepSpeed's CPU Adam, named in the config.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.learning_rate,
                "betas": [train.adam_beta1, train.adam_beta2],
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
            },
        }
    return config


def inference_deepspeed_config(ds: DeepSpeedConfig, precision: str, on_gpu: bool) -> dict:
    """Config for a frozen model: ZeRO-3 shards weights, nothing allocates optimizer state."""
    zero: dict[str, Any] = {"stage": 3 if ds.zero_stage == 3 else 0}
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7)
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**12,
    }


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class Engine:
    """Distributed state plus DeepSpeed wrapping for one run. Create one per process."""

    def __init__(self, train: TrainConfig, ds: DeepSpeedConfig, seed: int):
        self.train_cfg = train
        self.ds_cfg = ds
        self.seed = seed
        self.on_gpu = torch.cuda.is_available()
        self._init_distributed()
        self.layout = batch_layout(train, self.world_size)
        self.ds_config = build_deepspeed_config(train, ds, self.layout, self.on_gpu)
        self.ds_engine = None
        self._hf_ds_configs: list[Any] = []  # kept alive: transformers holds only a weakref
        self.global_step = 0
        set_seed(seed + self.rank)

    # -- distributed ---------------------------------------------------------
    def _init_distributed(self) -> None:
        import deepspeed

        if "WORLD_SIZE" not in os.environ:  # a plain single-process run
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = self.ds_cfg.backend
        if backend == "auto":
            backend = "nccl" if self.on_gpu else "gloo"
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.on_gpu:
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                timeout=timedelta(minutes=self.ds_cfg.timeout_minutes),
            )
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
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.comm_device).reshape(1).clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """All-reduce a dict of per-rank sums (one collective)."""
        keys = sorted(sums)
        tensor = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return dict(zip(keys, tensor.tolist()))

    def reduce_max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
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

    @property
    def comm_device(self) -> torch.device:
        return self.device

    # -- model construction --------------------------------------------------
    @contextlib.contextmanager
    def model_init(self, trainable: bool = True):
        """Context for `from_pretrained`: under ZeRO-3 weights are partitioned as they load.

        transformers decides through a live HfDeepSpeedConfig (a weakref), so we keep
        the object alive for the engine's lifetime.
        """
        if self.ds_cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            config = self.ds_config if trainable else inference_deepspeed_config(
                self.ds_cfg, self.train_cfg.precision, self.on_gpu
            )
            self._hf_ds_configs.append(HfDeepSpeedConfig(config))
        yield

    @contextlib.contextmanager
    def plain_init(self):
        """Load models whole (no ZeRO-3 partitioning) inside, e.g. on one rank for export or evaluation."""
        if not self._hf_ds_configs:
            yield
            return
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            set_hf_deepspeed_config(self._hf_ds_configs[-1])

    def prepare(self, model: torch.nn.Module, total_steps: int):
        """Wrap a trainable model: optimizer, LR schedule, ZeRO, precision. Returns the engine."""
        import deepspeed

        t = self.train_cfg
        warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
        schedule = lr_lambda(total_steps, warmup, t.lr_scheduler, t.min_lr_ratio)
        groups = _param_groups(model, t.weight_decay)
        optimizer = None
        if "optimizer" not in self.ds_config:
            # The fused kernel (CPU and CUDA) is also TRL's default; unfused AdamW was ~40% of a
            # SmolLM2 CPU step on DeepSpeed's flat fp32 partition.
            params = [p for g in groups for p in g["params"]]
            fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
            optimizer = torch.optim.AdamW(
                groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused or None
            )
        from alignment.modeling import Forwarder

        ds_engine, _, _, _ = deepspeed.initialize(
            model=Forwarder(model),
            model_parameters=groups if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.ds_engine = ds_engine
        return ds_engine

    def prepare_frozen(self, model: torch.nn.Module):
        """A frozen model for inference only: no optimizer state, ZeRO-3 sharded when asked."""
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        if self.ds_cfg.zero_stage == 3:
            import deepspeed

            config = inference_deepspeed_config(self.ds_cfg, self.train_cfg.precision, self.on_gpu)
            from alignment.modeling import Forwarder

            engine, *_ = deepspeed.initialize(model=Forwarder(model), config=config, dist_init_required=False)
            engine.eval()
            return engine
        from alignment.models import torch_dtype

        return model.to(device=self.device, dtype=torch_dtype(self.train_cfg.precision))

    # -- training step -------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of the global mean (sum / global count).

        DeepSpeed averages gradients over ranks; multiplying by world size turns that
        average into the sum the global mean needs. No extra 1/accumulation scaling.
        """
        # Every forward went through DeepSpeed's engine forward (alignment.modeling.Forwarder), which
        # starts the ZeRO micro-step and registers the backward prologue; without that, ZeRO-3 with
        # accumulation > 1 silently trained on the last micro-batch only.
        self.ds_engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> bool:
        """Call after every micro-batch; returns True when the optimizer stepped."""
        boundary = self.ds_engine.is_gradient_accumulation_boundary()
        self.ds_engine.step()
        if boundary:
            self.global_step += 1
        return boundary

    def current_lr(self) -> float:
        return float(self.ds_engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.ds_engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    # -- checkpoints ---------------------------------------------------------
    def save_checkpoint(self, root: Path, trainer_state: dict, keep: int) -> Path:
        """Write checkpoints/step-N atomically: a partial directory is renamed only when complete."""
        step = trainer_state["step"]
        final = Path(root) / f"step-{step:08d}"
        partial = Path(root) / f".step-{step:08d}.partial"
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.barrier()
        self.ds_engine.save_checkpoint(str(partial), tag="state", client_state={}, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{self.rank:05d}.pt")
        self.barrier()
        if self.is_main:
            state = dict(trainer_state, world_size=self.world_size, time=time.time())
            (partial / CHECKPOINT_DONE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load_checkpoint(self, path: Path) -> dict:
        path = Path(path)
        state = json.loads((path / CHECKPOINT_DONE).read_text())
        load_path, _ = self.ds_engine.load_checkpoint(
            str(path), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        rng_file = path / f"rng_rank{self.rank:05d}.pt"
        if state.get("world_size") == self.world_size and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            set_seed(self.seed + self.rank + 7919 * int(state["step"]))
        self.global_step = int(state["step"])
        return state

    # -- weights -------------------------------------------------------------
    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every persistent tensor of `module`, gathered from ZeRO-3 shards, on rank 0 (CPU).

        Other ranks return {}; all ranks must call (the gathers are collective).
        Tied parameters appear under each of their names.
        """
        out: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = id(tensor)
            if key not in gathered:
                if hasattr(tensor, "ds_id"):
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                        value = tensor.data.detach().cpu().clone() if self.is_main else None
                else:
                    value = tensor.detach().cpu().clone() if self.is_main else None
                gathered[key] = value
            if self.is_main:
                out[name] = gathered[key]
        return out

    @contextlib.contextmanager
    def gathered_parameters(self, module: torch.nn.Module):
        """All of `module`'s parameters whole on every rank for the duration (ZeRO-3), else a no-op.

        Used for generation: gathering once per rollout instead of at every decoding step.
        """
        params = [p for p in module.parameters() if hasattr(p, "ds_id")]
        if not params:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / CHECKPOINT_DONE).is_file()]
    return sorted(found, key=lambda p: p.name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def iter_chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
