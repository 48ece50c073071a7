"""Typed recipe schema: YAML in, validated dataclasses out.

A recipe is a YAML file whose keys mirror the dataclasses below. Loading is strict:
an unknown or misspelt key is an error naming the key and the closest valid one;
a value of the wrong type is an error naming the dotted key; cross-field
contradictions (batch arithmetic, offload without ZeRO, ...) are errors raised
before any model is loaded. ``--set a.b=value`` overrides apply dotted keys with
the same checks. The resolved recipe is written to ``output_dir/recipe.yaml``.

Batch arithmetic is derived once, in :func:`batch_layout`:
``micro_batch_size * grad_accum_steps * world_size == global_batch_size``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from alignment.core.precision import resolve_precision
from alignment.errors import UserError


class RecipeError(UserError):
    """A recipe that cannot be run as written (unknown key, wrong type, contradiction)."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; recipes mean a number."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


# ---------------------------------------------------------------------------
# Sections shared by every stage
# ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str = "???"
    """Local HF directory, hub id, or a built-in name: `smollm2-135m`, `tiny-llama`."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust the source."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% more compute."""
    lean_activations: bool = True
    """Trainable models' RMSNorm and SwiGLU MLP keep less for the backward (their input in its own dtype,
    not an fp32 copy and the intermediates) and recompute the rest: the same outputs, about 37% less
    activation memory on SmolLM2 (alignment/core/lean_layers.py). Models with other layers are unchanged."""
    attn_implementation: Optional[str] = None
    """Passed to transformers (`sdpa`, `eager`, `flash_attention_2`). None = automatic: `eager` on CPU
    when rows are at most 512 tokens (faster there), else transformers' default (`sdpa`)."""
    tokenizer: Optional[str] = None
    """Tokenizer path or id when it differs from the model's."""
    export_dtype: Literal["auto", "fp32"] = "auto"
    """dtype of final/: auto = the training precision (bf16 runs write bf16, half the size); fp32 = the
    optimizer's fp32 master weights of a bf16/fp16 full fine-tune, which keep updates smaller than bf16's
    rounding step (DPO at lr 1e-6 changes most weights by less than that; TRL's AMP saves fp32 too)."""


@dataclass
class DataConfig:
    train: str = "???"
    """Training rows: a data file (JSON lines, JSON, Parquet, CSV), a folder written by datasets' save_to_disk, a
    `datasets` hub name, or `builtin:<name>` (the built-in task's data). Shapes: docs/data-formats.md."""
    eval: Optional[str] = "auto"
    """Held-out rows, named like `train`; `auto` = the built-in eval set when `train` is a built-in train set
    (builtin:sft_train -> builtin:sft_eval), else a seeded held-out split of `train` (data.eval_fraction, 0.1
    unless set); null = no held-out evaluation. The data report names what was read."""
    eval_fraction: Optional[float] = None
    """Hold out this fraction of `train` (seeded) as the eval rows; only with `eval` auto or null."""
    subset: Optional[str] = None
    """The configuration (subset) of a hub dataset."""
    eval_split: Optional[str] = None
    """The split `eval` is read from when it is a hub dataset or a DatasetDict folder; None = `test` when `split` is
    `train`, else `split`."""
    max_length: int = 512
    """Maximum tokens per example (prompt + response)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """SFT rows longer than `max_length`: cut the end off, or drop and count them. Preference pairs and KTO answers
    are cut from the prompt's start and the responses' end instead (docs/data-formats.md, alignment.data.text.fit)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops the run with file/line/field (`error`) or is skipped and counted."""
    format: str = "auto"
    """Row shape; `auto` detects it from the row's fields. SFT: messages, prompt_completion, text (alignment.data.sft);
    preference pairs (rm, dpo): explicit, implicit, hh, ab (alignment.data.preference). Shapes: docs/data-formats.md."""
    skip_rows: int = 0
    """Leave out the first N rows of train (after the seeded shuffle of a split, before max_rows): a later
    stage of a pipeline can train on rows an earlier stage, which read the same file, never saw."""
    max_rows: Optional[int] = None
    """Use only the first N rows of train (after the seeded shuffle of a split and skip_rows), for quick runs."""
    max_eval_rows: Optional[int] = None
    """Use only the first N eval rows."""
    packing: bool = False
    """Pack examples into rows of `max_length` tokens, without padding; attention never crosses example
    boundaries. Reward models with rm.share_prompt pack [prompt | chosen | rejected] segments, up to
    2 x max_length - 1 tokens each. Needs eager or sdpa attention (a 4D block mask)."""
    split: str = "train"
    """Split name for `datasets` hub data."""


@dataclass
class TrainConfig:
    global_batch_size: int = 8
    """Examples per optimizer step across all ranks."""
    micro_batch_size: int = 8
    """Examples per forward/backward on one rank. Gradient accumulation is derived."""
    num_epochs: float = 1.0
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps; None = derived from `num_epochs`."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to min_lr_ratio x the peak, or constant."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps (0: warmup_ratio decides)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of total steps; used when `warmup_steps` is 0."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak for cosine/linear decay."""
    weight_decay: float = 0.0
    """AdamW weight decay of weight matrices (not of norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    precision: Literal["auto", "bf16", "bf16-mixed", "fp16", "fp32"] = "auto"
    """auto = bf16 mixed precision where the device has fast bf16 matmuls (a CUDA GPU with bf16, a CPU with
    oneDNN's AVX512/AMX bf16 kernels), else fp32; resolved when the recipe loads and printed. bf16 keeps the
    module's weights in bf16 (fp32 masters in the optimizer); bf16-mixed keeps weights, gradients and optimizer
    in fp32 and runs the forward under torch.autocast(bf16), as TRL/transformers' Trainer does with bf16=True:
    slower, but the training pass is closer to fp32 (online RL's ratios and its Adam steps; docs/experiments.md)."""
    log_interval: int = 1
    """Write metrics every N optimizer steps."""
    eval_interval: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    eval_before_training: bool = True
    """Also evaluate the initial model (logged at step 0), so every curve has its baseline."""
    save_interval: int = 0
    """Checkpoint every N optimizer steps (0: no periodic checkpoints)."""
    keep_checkpoints: int = 2
    """Keep the newest N periodic checkpoints."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer state on CPU (ZeRO >= 1)."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO-3 only)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend; auto = nccl with CUDA, gloo on CPU."""
    timeout_minutes: float = 10.0
    """Collective timeout: a hung rank fails the job after this long instead of hanging forever."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters instead of every weight (the base stays frozen)."""
    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Adapter scale: its output is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or `all-linear`) that get adapters."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapters (e.g. `score` for reward heads)."""
    merge_on_export: bool = True
    """Also write `final/merged/`: base weights with the adapter merged in."""


@dataclass
class LoggingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = online with WANDB_API_KEY set, otherwise offline."""
    project: str = "alignment"
    """wandb project name."""
    run_name: Optional[str] = None
    """wandb run name; None = the output directory's name."""
    progress_bar: bool = True
    """A progress bar with tokens/s and time left on the main rank."""


@dataclass
class RecipeBase:
    output_dir: str = "???"
    """Where the run writes: recipe.yaml, run_info.json, manifest.json, metrics.jsonl, checkpoints/, final/."""
    seed: int = 42
    """Seeds data order, initialisation, sampling and held-out splits; the same seed gives the same run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------

_MISSING = "???"


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}.")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {type(value).__name__} {value!r}.")
        return value
    raise RecipeError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys, got {type(raw).__name__} {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise RecipeError(f"unknown key '{dotted}'.{_suggest(str(key), list(fields))}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _missing_required(obj: Any, where: str = "") -> list[str]:
    missing = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{where}.{f.name}" if where else f.name
        if isinstance(value, str) and value == _MISSING:
            missing.append(dotted)
        elif dataclasses.is_dataclass(value):
            missing.extend(_missing_required(value, dotted))
    return missing


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise RecipeError(f"--set expects dotted.key=value, got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str], cls: type) -> dict:
    """Apply dotted overrides to the raw mapping, checking every key against the schema."""
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls, where = raw, cls, ""
        for i, part in enumerate(path):
            names = [f.name for f in dataclasses.fields(node_cls)] if dataclasses.is_dataclass(node_cls) else []
            dotted = f"{where}.{part}" if where else part
            if part not in names:
                raise RecipeError(f"--set: unknown key '{dotted}'.{_suggest(part, names)}")
            if i == len(path) - 1:
                node[part] = value
            else:
                if node.get(part) is None:  # `section:` with nothing under it
                    node[part] = {}
                node = node[part]
                if not isinstance(node, dict):
                    raise RecipeError(f"--set: '{dotted}' is not a section.")
                node_cls = typing.get_type_hints(node_cls)[part]
                where = dotted
    return raw


def build_recipe(path: str | Path | None, cls: type, overrides: list[str] | None = None,
                 check: Callable[[Any], Any] | None = None) -> Any:
    """Read, override, type-check and validate a recipe of schema `cls` (alignment.core.recipes.load_recipe
    gives each stage's): the shared checks of `validate`, the precision resolved, then `check` (the stage's own
    cross-field checks) or the schema's own `validate()` (the pipeline)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            raw = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of keys.")
    raw = apply_overrides(raw, overrides or [], cls)
    try:
        recipe = _build(cls, raw, "")
    except RecipeError as exc:
        raise RecipeError(f"{path or 'recipe'}: {exc}") from None
    missing = _missing_required(recipe)
    if missing:
        raise RecipeError(f"{path or 'recipe'}: required keys not set: {', '.join(missing)}.")
    if isinstance(recipe, RecipeBase):
        validate(recipe, source=str(path or "recipe"))
        _resolve_precision(recipe)
        if check is not None:
            try:
                check(recipe)
            except RecipeError as exc:
                raise RecipeError(f"{path or 'recipe'}: {exc}") from None
    elif hasattr(recipe, "validate"):  # recipes of their own shape (the pipeline) check themselves
        try:
            recipe.validate()
        except ValueError as exc:
            raise RecipeError(f"{path or 'recipe'}: {exc}") from None
    return recipe


_PRECISION_NOTES: set = set()


def _resolve_precision(recipe: RecipeBase) -> None:
    """Replace `train.precision: auto` by what this device runs fast (alignment.core.precision), once, so
    everything downstream sees a concrete precision; say so on the first rank."""
    recipe.train.precision, note = resolve_precision(recipe.train.precision)
    if note and note not in _PRECISION_NOTES and os.environ.get("RANK", "0") == "0":
        _PRECISION_NOTES.add(note)
        print(note, file=sys.stderr, flush=True)


def validate(recipe: RecipeBase, source: str = "recipe") -> None:
    """Cross-field checks that do not depend on the world size."""
    problems = []
    t, ds, d = recipe.train, recipe.deepspeed, recipe.data
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        problems.append("train.micro_batch_size and train.global_batch_size must be >= 1")
    elif t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train.global_batch_size ({t.global_batch_size}) is not a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    if t.max_steps is not None and t.max_steps < 1:
        problems.append("train.max_steps must be >= 1 (or null to derive it from num_epochs)")
    if t.num_epochs <= 0:
        problems.append("train.num_epochs must be > 0")
    if t.learning_rate < 0:
        problems.append("train.learning_rate must be >= 0")
    if not 0.0 <= t.warmup_ratio < 1.0:
        problems.append("train.warmup_ratio must be in [0, 1)")
    if ds.zero_stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.offload_params and ds.zero_stage != 3:
        problems.append("deepspeed.offload_params needs deepspeed.zero_stage: 3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        problems.append("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if d.max_length < 8:
        problems.append("data.max_length must be >= 8")
    if d.eval_fraction is not None and not 0.0 <= d.eval_fraction < 1.0:
        problems.append("data.eval_fraction must be in [0, 1)")
    if d.eval not in (None, "auto") and d.eval_fraction:
        problems.append("set data.eval or data.eval_fraction, not both (data.eval names held-out rows; "
                        "data.eval_fraction holds out part of data.train)")
    if d.skip_rows < 0:
        problems.append(f"data.skip_rows must be >= 0, got {d.skip_rows}")
    if recipe.lora.enabled and recipe.lora.r < 1:
        problems.append("lora.r must be >= 1")
    attention = recipe.model.attn_implementation
    if d.packing and attention not in (None, "eager", "sdpa"):
        # Packed rows carry a 4D block mask (shared-prompt RM segments cannot be told apart by
        # position ids), which only these kernels honour.
        problems.append(f"data.packing needs model.attn_implementation eager, sdpa or unset, got {attention!r}")
    for name in ("log_interval", "eval_interval", "save_interval", "keep_checkpoints"):
        if getattr(t, name) < 0:
            problems.append(f"train.{name} must be >= 0")
    if t.log_interval == 0:
        problems.append("train.log_interval must be >= 1")
    if problems:
        raise RecipeError(f"{source}: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class BatchLayout:
    """Batch sizes, derived once for a given world size."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int


def batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise RecipeError(
            f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x world size ({train.micro_batch_size} x {world_size} = {per_step})."
        )
    layout = BatchLayout(
        global_batch_size=train.global_batch_size,
        micro_batch_size=train.micro_batch_size,
        grad_accum_steps=train.global_batch_size // per_step,
        world_size=world_size,
    )
    assert layout.micro_batch_size * layout.grad_accum_steps * layout.world_size == layout.global_batch_size
    return layout


def to_dict(recipe: Any) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
