"""The DeepSpeed engine layer: with alignment.core.distributed and .checkpoint, the only code that
touches deepspeed.

Every stage gets an :class:`Engine` and calls it; no stage imports deepspeed. The engine holds
the job's :class:`~alignment.core.distributed.Distributed` state (`engine.dist`) and the batch
layout, builds the DeepSpeed config from the recipe, and wraps models: trainable ones
(optimizer, LR schedule, ZeRO 0-3, offload, precision, clipping, accumulation; a stage may
prepare several, e.g. PPO's actor and critic) and frozen ones for inference (reference and
reward models, sharded under ZeRO-3 with no optimizer state). It also gathers full weights
for export and for hook-free generation. Checkpoints: alignment.core.checkpoint.

Loss normalisation. A stage hands :meth:`Engine.backward` this rank's *sum* of
per-item losses divided by the item count of the whole optimizer step across all
ranks (:meth:`Distributed.global_sum`). The engine undoes DeepSpeed's averaging over
ranks, so the gradient is exactly that of the global mean, whatever the split
into ranks and micro-batches (1 rank x 4 micro == 2 ranks x 2 micro).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

# DeepSpeed trap seen here: torch._dynamo must be imported before any zero.Init.
import torch._dynamo  # noqa: F401

from alignment.core.config import BatchLayout, DeepSpeedConfig, TrainConfig, batch_layout
from alignment.core.distributed import Distributed, set_seed
from alignment.core.modeling import Forwarder, unwrap, user_model
from alignment.core.models import torch_dtype
from alignment.core.precision import resolve_precision


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
        "torch_autocast": {"enabled": train.precision == "bf16-mixed", "dtype": "bfloat16"},
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
        "torch_autocast": {"enabled": precision == "bf16-mixed", "dtype": "bfloat16"},
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
    """The job's distributed state, its batch layout, and DeepSpeed wrapping. Create one per process."""

    def __init__(self, train: TrainConfig, ds: DeepSpeedConfig, seed: int):
        if train.precision == "auto":  # a TrainConfig built in code, not through load_recipe
            train.precision = resolve_precision("auto")[0]
        self.train_cfg = train
        self.ds_cfg = ds
        self.seed = seed
        self.dist = Distributed(ds)
        self.on_gpu = self.dist.on_gpu
        self.layout = batch_layout(train, self.dist.world_size)
        self.ds_config = build_deepspeed_config(train, ds, self.layout, self.on_gpu)
        self._hf_ds_configs: list[Any] = []  # kept alive: transformers holds only a weakref
        set_seed(seed + self.dist.rank)

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

    def prepare(self, model: torch.nn.Module, total_steps: int, learning_rate: float | None = None):
        """Wrap a trainable model: optimizer, LR schedule, ZeRO, precision. Returns the engine.

        A stage may prepare several (PPO's actor and critic), each with its own optimizer;
        `learning_rate` overrides train.learning_rate for this one (the schedule's shape is shared)."""
        import dataclasses

        import deepspeed

        t = self.train_cfg
        if learning_rate is not None:
            t = dataclasses.replace(t, learning_rate=learning_rate)
        config = dict(self.ds_config)
        if "optimizer" in config:
            config["optimizer"] = {**config["optimizer"], "params": {**config["optimizer"]["params"],
                                                                     "lr": t.learning_rate}}
        warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
        schedule = lr_lambda(total_steps, warmup, t.lr_scheduler, t.min_lr_ratio)
        groups = _param_groups(model, t.weight_decay)
        optimizer = None
        if "optimizer" not in config:
            # The fused kernel (CPU and CUDA) is also TRL's default; unfused AdamW was ~40% of a
            # SmolLM2 CPU step on DeepSpeed's flat fp32 partition.
            params = [p for g in groups for p in g["params"]]
            fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
            optimizer = torch.optim.AdamW(
                groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused or None
            )
        ds_engine, _, _, _ = deepspeed.initialize(
            model=Forwarder(model),
            model_parameters=groups if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=config,
            dist_init_required=False,
        )
        return ds_engine

    def prepare_frozen(self, model: torch.nn.Module):
        """A frozen model for inference only: no optimizer state, ZeRO-3 sharded when asked."""
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        if self.ds_cfg.zero_stage == 3:
            import deepspeed

            config = inference_deepspeed_config(self.ds_cfg, self.train_cfg.precision, self.on_gpu)
            engine, *_ = deepspeed.initialize(model=Forwarder(model), config=config, dist_init_required=False)
            engine.eval()
            return engine
        return model.to(device=self.dist.device, dtype=torch_dtype(self.train_cfg.precision))

    # -- training step -------------------------------------------------------
    def backward(self, model, loss: torch.Tensor) -> None:
        """Backward of this rank's share of the global mean (sum / global count).

        DeepSpeed averages gradients over ranks; multiplying by world size turns that
        average into the sum the global mean needs. No extra 1/accumulation scaling.
        """
        # Every forward went through DeepSpeed's engine forward (alignment.core.modeling.Forwarder), which
        # starts the ZeRO micro-step and registers the backward prologue; without that, ZeRO-3 with
        # accumulation > 1 silently trained on the last micro-batch only.
        model.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    @staticmethod
    def step(model) -> bool:
        """Call after every micro-batch of `model` (a prepared engine); True when its optimizer stepped."""
        if getattr(model, "_alignment_optimizer_released", False):
            raise RuntimeError("this model's optimizer state was released (Engine.release_optimizer_state): "
                               "its training is over; an optimizer step now would restart Adam from zero moments")
        boundary = model.is_gradient_accumulation_boundary()
        model.step()
        return boundary

    @staticmethod
    def current_lr(model) -> float:
        return float(model.get_lr()[0])

    @staticmethod
    def grad_norm(model) -> float | None:
        norm = model.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    @staticmethod
    def release_optimizer_state(model) -> int:
        """Training of `model` (a prepared engine) is over: free its optimizer's per-parameter state (AdamW's
        two moments, 8 bytes per trained parameter: the largest single part of a full fine-tune's memory),
        so that export, its reload check in a second process and the final evaluation run without it.
        Weights, fp32 master copies included, stay. Returns the bytes freed; a later `step` raises.
        Call after the last checkpoint (a checkpoint holds this state)."""
        optimizer, freed, seen = getattr(model, "optimizer", None), 0, set()
        while optimizer is not None and id(optimizer) not in seen:  # DeepSpeed's wrappers hold the torch one
            seen.add(id(optimizer))
            state = getattr(optimizer, "state", None)
            if isinstance(optimizer, torch.optim.Optimizer) and state:
                for per_param in state.values():
                    freed += sum(v.numel() * v.element_size() for v in per_param.values()
                                 if torch.is_tensor(v) and v.numel() > 1)
                state.clear()
            optimizer = getattr(optimizer, "optimizer", None)
        for param in model.parameters():  # ZeRO-1/2 map each weight to views of the moments (universal checkpoints)
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None and getattr(mapping, "optim_fragment", None):
                mapping.optim_fragment = {}
        model._alignment_optimizer_released = True
        return freed

    # -- weights -------------------------------------------------------------
    def full_state_dict(self, module: torch.nn.Module, fp32_masters: bool = False) -> dict[str, torch.Tensor]:
        """Every persistent tensor of `module`, gathered from ZeRO-3 shards, on rank 0 (CPU).

        Other ranks return {}; all ranks must call (the gathers are collective).
        Tied parameters appear under each of their names. With `fp32_masters` (a bf16/fp16 run), trained
        parameters come from the optimizer's fp32 master copy (frozen ones as the module holds them).
        """
        out: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor] = {}
        master = fp32_masters and self.train_cfg.precision not in ("fp32", "bf16-mixed")
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = id(tensor)
            if key not in gathered:
                hp = None
                if master and isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad and (
                        hasattr(tensor, "_hp_mapping") or hasattr(tensor, "_z3_optimizer")):
                    # The bf16/fp16 module weight is the fp32 master rounded; at small learning rates (DPO's
                    # 1e-6) the rounding erases most of the update. Collective over ranks, like the gather.
                    from deepspeed.utils import safe_get_full_fp32_param

                    hp = safe_get_full_fp32_param(tensor)
                if hp is not None:
                    value = hp.detach().cpu().clone() if self.dist.is_main else None
                elif hasattr(tensor, "ds_id"):
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                        value = tensor.data.detach().cpu().clone() if self.dist.is_main else None
                else:
                    value = tensor.detach().cpu().clone() if self.dist.is_main else None
                gathered[key] = value
            if self.dist.is_main:
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

    @contextlib.contextmanager
    def generation_view(self, prepared):
        """The user model inside `prepared` (an engine from prepare / prepare_frozen, or a plain model), ready
        for decoding: eval mode, no gradient checkpointing, and under ZeRO-3 every weight gathered once and
        ZeRO's module hooks removed, so decoding runs hook-free instead of all-gathering at every token
        (FAILURES rows 6, 7: slow, and a deadlock when ranks stop at different steps). Restored on exit."""
        model = user_model(prepared)
        hf = unwrap(prepared)
        was_training, checkpointing = model.training, getattr(hf, "is_gradient_checkpointing", False)
        if checkpointing:
            hf.gradient_checkpointing_disable()
        model.eval()
        offload = _zero3_offload(prepared)
        try:
            if offload is None:
                yield model
            else:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    _remove_zero3_hooks(offload)
                    try:
                        yield model
                    finally:
                        _restore_zero3_hooks(offload)
        finally:
            model.train(was_training)
            if checkpointing:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @contextlib.contextmanager
    def modifying(self, params: list[torch.nn.Parameter]):
        """Change parameters in place inside (e.g. a new head's init). Under ZeRO-3 they are gathered whole
        first and rank 0's values are partitioned back on exit (a write to a partitioned parameter is lost);
        otherwise DeepSpeed broadcasts rank 0's weights when the model is prepared."""
        partitioned = [p for p in params if hasattr(p, "ds_id")]
        if not partitioned:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
            yield

    def close(self) -> None:
        self.dist.close()


def _zero3_offload(prepared):
    """DeepSpeed's ZeRO-3 parameter manager of a prepared engine (None when not partitioned)."""
    optimizer = getattr(prepared, "optimizer", None)
    if optimizer is None or not any(hasattr(p, "ds_id") for p in prepared.parameters()):
        return None
    return getattr(optimizer, "parameter_offload", optimizer)


def _remove_zero3_hooks(offload) -> None:
    for param in offload.module.parameters(recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def _restore_zero3_hooks(offload) -> None:
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the decoding forwards are not the trace training replays
    offload._register_deepspeed_module(offload.module)
