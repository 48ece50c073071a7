"""Model and tokenizer resolution: local directories, hub ids and built-in names.

Built-in names (``smollm2-135m``, ``tiny-llama``; see alignment.builtin, which registers
them) resolve to plain HF directories in the cache, built once. Anything else is a local
directory or a hub id, loaded by transformers as usual (``HF_HUB_OFFLINE=1`` is honoured by
transformers itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from alignment.errors import UserError


class ModelError(UserError):
    """A model that cannot be had: a path that does not exist, a directory that is no model, an unreachable hub,
    a reward model without what a recipe asks of it."""


@dataclass(frozen=True)
class BuiltinModel:
    cache_name: str
    """Directory name in the cache; carries a version so a changed builder never serves a stale entry."""
    builder: Callable[[Path], None]
    """Writes the model directory (config, weights, tokenizer) into the folder it is given."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register_builtin_model(name: str, cache_name: str, builder: Callable[[Path], None]) -> None:
    """Make `model.name_or_path: NAME` resolve to a cache entry built by `builder` (alignment.builtin)."""
    BUILTIN_MODELS[name] = BuiltinModel(cache_name, builder)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("ALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alignment")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive lock across processes (several ranks may build the same cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def model_dir_problems(path: Path) -> list[str]:
    """What a model directory lacks to load: config.json with a model_type, weights, a tokenizer."""
    path = Path(path)
    problems = []
    config = path / "config.json"
    try:
        if "model_type" not in json.loads(config.read_text()):
            problems.append("config.json has no model_type")
    except (OSError, ValueError):
        problems.append("no readable config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        problems.append("no weights (*.safetensors)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        problems.append("no tokenizer")
    return problems


def build_once(name: str, builder: Callable[[Path], None],
               check: Callable[[Path], list[str]] | None = None) -> Path:
    """Return cache/<name>, building it with builder(tmp_dir) under a lock unless it is complete.

    One process builds while the others wait on the lock. `check` lists what a built entry
    lacks: an entry is marked complete only when that list is empty, and an entry marked
    complete that has lost something is rebuilt.
    """
    target = cache_dir() / name
    marker = target / ".complete"

    def whole() -> bool:
        return marker.exists() and not (check and check(target))

    if whole():
        return target
    with file_lock(cache_dir() / f".{name}.lock"):
        if whole():
            return target
        tmp = cache_dir() / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            builder(tmp)
            missing = check(tmp) if check else []
            if missing:
                raise RuntimeError(f"building cache entry {name!r} left it incomplete: {'; '.join(missing)}")
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_in_fresh_process(builder: Callable[[Path], None]) -> Callable[[Path], None]:
    """`builder` run in a new Python process, one without torch.distributed state.

    transformers 5 writes `save_pretrained` files only on torch.distributed rank 0, so a builder
    running inside rank 1 of a job wrote a tokenizer and no config or weights. A fresh process
    writes everything whichever rank asked for the build.
    """

    def run(out: Path) -> None:
        target = f"{builder.__module__}:{builder.__qualname__}"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        result = subprocess.run([sys.executable, "-m", "alignment.core.models", "build", target, str(out)],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"building {target} into {out} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")

    return run


def resolve_model_path(name_or_path: str, revision: str | None = None) -> str:
    """Turn a recipe's `model.name_or_path` into something `from_pretrained` can load: a built-in name (built once
    into the cache), a local model directory, or a hub id that is reachable or cached. Anything else is a
    ModelError naming what is wrong, before any download or load starts."""
    builtin = BUILTIN_MODELS.get(name_or_path)
    if builtin is not None:
        return str(build_once(builtin.cache_name, build_in_fresh_process(builtin.builder), check=model_dir_problems))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: a folder, but no model in it (no config.json)")
        return str(path)
    if not is_hub_id(name_or_path):
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ModelError(f"model path does not exist: {name_or_path}{where}")
    check_hub_model(name_or_path, revision)
    return name_or_path


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a hub repository id ("name" or "org/name"); a path-like name cannot."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def check_hub_model(repo_id: str, revision: str | None = None) -> None:
    """A hub model is there before anything loads: in the local cache when HF_HUB_OFFLINE=1, else on the hub,
    asked once with a short timeout and no retries (transformers' own retries take a minute to fail)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    at = f"{repo_id}{f'@{revision}' if revision else ''}"
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelError(f"{at}: no such local directory, and not in the local Hugging Face cache while "
                             "HF_HUB_OFFLINE=1; download it once with network access, or give a local directory")
        return
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:
        raise ModelError(f"{at}: a gated model; accept its terms on the hub and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{at}: the hub has no revision {revision!r} of this model") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{at}: no such local directory (relative to {Path.cwd()}), and no such model on the hub "
                         "(or a private one: log in with `hf auth login`)") from None
    except Exception as exc:  # the hub cannot be reached: connection refused, DNS, timeout, proxy
        hint = ("it is in the local cache: set HF_HUB_OFFLINE=1 to use it" if cached else
                "to work offline, give a local model directory, or download it once and set HF_HUB_OFFLINE=1")
        raise ModelError(f"{at}: cannot reach the Hugging Face hub at {constants.ENDPOINT} "
                         f"({type(exc).__name__}: {str(exc)[:120]}); {hint}") from None


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """Load a tokenizer with right padding and a pad token.

    When the tokenizer has no pad token we use EOS for padding. Loss masks never
    come from comparing ids with the pad id (that would also mask real EOS
    tokens); they come from the attention mask and the label masks we build.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if tokenizer.chat_template is None:
        problem = chatml_problem(tokenizer)
        if problem is None:
            tokenizer.chat_template = CHATML_TEMPLATE
            warnings.warn(f"{path}: the tokenizer has no chat template; using ChatML, whose <|im_start|> and "
                          "<|im_end|> are single tokens of its vocabulary and <|im_end|> its EOS", stacklevel=2)
        else:
            warnings.warn(f"{path}: the tokenizer has no chat template and ChatML cannot stand in ({problem}); "
                          "chat rows will be refused (prompt/completion strings and text rows still work). Set "
                          "model.tokenizer to one with a chat template.", stacklevel=2)
    return tokenizer


def chatml_problem(tokenizer) -> str | None:
    """Why the ChatML template would not fit this tokenizer (None when it fits): its markers must be single
    tokens, and EOS must be <|im_end|> so that generation stops where a turn ends."""
    for marker in ("<|im_start|>", "<|im_end|>"):
        if len(tokenizer(marker, add_special_tokens=False).input_ids) != 1:
            return f"{marker} is not a single token"
    if tokenizer.eos_token != "<|im_end|>":
        return f"its EOS is {tokenizer.eos_token!r}, not <|im_end|>"
    return None


def torch_dtype(precision: str):
    import torch

    # bf16-mixed: the weights stay fp32, the forward runs under autocast (the engine's torch_autocast).
    return {"bf16": torch.bfloat16, "bf16-mixed": torch.float32, "fp16": torch.float16, "fp32": torch.float32}[precision]


# Measured on CPU (bf16, 1 thread, SmolLM2 layers, forward + backward): transformers' eager
# attention (batched matmuls, fp32 softmax) beat SDPA's CPU kernel by 25% at 192-token rows
# (whole model: 6.2 s against 9.3 s per RM micro-batch), broke even near 512 and lost beyond
# (1.4x slower at 1024, 1.9x at 2048). GPUs keep transformers' default. Rows of shared-prompt
# segments under a block mask (reward models' rm.share_prompt, up to 2 x max_length tokens) are the
# exception: bench/rm.py (2026-12-03, rows up to 384 tokens, 1 thread) ran 1.51 pairs/s at a peak of
# 6,107 MiB with SDPA against 1.44 pairs/s and 7,358 MiB with eager, which keeps every layer's fp32
# attention probabilities [rows, heads, L, L] for the backward.
EAGER_ATTENTION_MAX_ROW = 512


def attention_for(requested: str | None, device_type: str, longest_row: int, block_masked: bool = False) -> str | None:
    """The attention implementation to load with: the recipe's choice when set, else `eager` on CPU for
    rows of at most EAGER_ATTENTION_MAX_ROW tokens without a shared-prompt block mask (`block_masked`),
    else transformers' default (SDPA)."""
    if requested:
        return requested
    if device_type == "cpu" and longest_row <= EAGER_ATTENTION_MAX_ROW and not block_masked:
        return "eager"
    return None


def load_model(
    path: str,
    kind: str = "causal_lm",
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    **extra: Any,
):
    """Load a causal LM (`causal_lm`) or a scalar-head sequence classifier (`reward`).

    Weights load in fp32; the engine casts to the training precision, which keeps
    master weights exact under bf16 mixed precision.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, revision=revision, dtype=torch.float32)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(extra)
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(
            f"{path} is a quantised checkpoint (config.quantization_config is set); "
            "training needs plain weights"
        )
    return model


def apply_lora(model, lora_cfg, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with peft LoRA adapters as the recipe's `lora` section says."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    target_modules: Any = "all-linear" if targets == ["all-linear"] else list(targets)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target_modules,
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def disable_dropout(model) -> int:
    """Turn every dropout in `model` off, as TRL does for preference training; returns how many.

    nn.Dropout modules (peft's LoRA dropout among them) get p = 0, and attention modules'
    float dropout rates (`attention_dropout`, which eager and SDPA attention read) get 0.
    Without this, the adapter-off reference of DPO is itself noisy, and a reward model trains
    a different function from the one it is evaluated and exported as.
    """
    import torch

    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            count += module.p > 0
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout_p"):
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                count += value > 0
                setattr(module, name, 0.0)
    return count


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), correct under ZeRO-3 where local tensors are empty."""
    trainable = total = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", None) or param.numel()
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total


def main(argv: list[str] | None = None) -> int:
    """`python -m alignment.core.models build MODULE:FUNCTION OUT_DIR` (see build_in_fresh_process)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "build":
        print("usage: python -m alignment.core.models build MODULE:FUNCTION OUT_DIR", file=sys.stderr)
        return 2
    module, _, function = args[1].partition(":")
    getattr(importlib.import_module(module), function)(Path(args[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
