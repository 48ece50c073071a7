"""Tests for alignment.core.config (strict recipes, overrides, batch layout), the LR schedule
and the CLI's recipe errors. Nothing here loads a model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignment.core.config import DeepSpeedConfig, RecipeError, TrainConfig, batch_layout, dump_recipe, to_dict
from alignment.core.recipes import RECIPES as STAGE_RECIPES, load_recipe
from alignment.core.recipes import SFTRecipe

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
REQUIRED_CONFIGS = ("configs/tiny/sft.yaml", "configs/smollm2/sft.yaml")


def _register_stages() -> None:
    """Import every stage module, as the CLI does for its stage: each registers its schema. A stage module
    that fails to import fails this file loudly (it used to be skipped, and its recipes went unchecked)."""
    from alignment import pipeline, stages  # noqa: F401

    for name in stages.MODULES:
        stages.load(name)


_register_stages()


STAGE_ALIASES = {"grpo": "ppo"}  # recipe files named after the estimator of a stage


def _stage_of(path: Path) -> str | None:
    """The stage a recipe file is for: its stem (`sft.yaml`), or the stem's part before the
    first '-' (`rm-hh.yaml` -> rm), through STAGE_ALIASES (`grpo.yaml` -> ppo); None when neither is."""
    for candidate in (path.stem, path.stem.split("-", 1)[0]):
        candidate = STAGE_ALIASES.get(candidate, candidate)
        if candidate in STAGE_RECIPES:
            return candidate
    return None


ALL_YAML = sorted({*CONFIG_DIR.rglob("*.yaml"), *CONFIG_DIR.rglob("*.yml")})
REGISTERED = [p for p in ALL_YAML if _stage_of(p) is not None]
UNREGISTERED = [p for p in ALL_YAML if _stage_of(p) is None]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _base(tmp_path: Path) -> dict:
    return {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": "tiny-llama"},
        "data": {"train": "builtin:sft_train"},
    }


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _write(tmp_path: Path, delta: dict | None = None, name: str = "recipe.yaml", raw: str | None = None) -> Path:
    path = tmp_path / name
    path.write_text(raw if raw is not None else yaml.safe_dump(_merge(_base(tmp_path), delta or {})))
    return path


def _load(tmp_path: Path, delta: dict | None = None, overrides: list[str] | None = None):
    return load_recipe(_write(tmp_path, delta), "sft", overrides)


# ---------------------------------------------------------------------------
# every shipped recipe parses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rel", REQUIRED_CONFIGS)
def test_required_configs_exist(rel):
    path = REPO / rel
    assert path.is_file(), f"{rel} is missing"
    assert path in REGISTERED, f"{rel} is not checked (stem {path.stem!r} not a registered stage)"


@pytest.mark.parametrize("path", REGISTERED, ids=[_rel(p) for p in REGISTERED])
def test_config_parses(path, tmp_path):
    stage = _stage_of(path)
    recipe = load_recipe(path, stage)
    assert isinstance(recipe, STAGE_RECIPES[stage])
    if stage == "pipeline":
        # a pipeline names stage recipes: each exists and loads with the pipeline's overrides
        for name in ("sft", "rm", "dpo"):
            part = getattr(recipe, name)
            assert isinstance(load_recipe(REPO / part.recipe, name, part.overrides), STAGE_RECIPES[name])
    else:
        # every shipped recipe is runnable on one rank: the batch arithmetic holds
        layout = batch_layout(recipe.train, world_size=1)
        assert layout.micro_batch_size * layout.grad_accum_steps == recipe.train.global_batch_size
    # the resolved recipe written to output_dir/recipe.yaml loads back to the same values
    dumped = tmp_path / "recipe.yaml"
    dump_recipe(recipe, dumped)
    assert to_dict(load_recipe(dumped, stage)) == to_dict(recipe)


def test_every_config_is_checked():
    """Each YAML under configs/ is loaded unless its stem names no registered stage; none slips through."""
    assert ALL_YAML, "no YAML found under configs/"
    checked = 0
    for path in ALL_YAML:
        stage = _stage_of(path)
        if stage is None:
            continue
        load_recipe(path, stage)
        checked += 1
    assert checked == len(REGISTERED)
    assert not UNREGISTERED, f"recipes no test loads: {[_rel(p) for p in UNREGISTERED]}"
    assert checked >= len(REQUIRED_CONFIGS)


def test_tiny_recipe_values():
    r = load_recipe(REPO / "configs/tiny/sft.yaml", "sft")
    assert r.model.name_or_path == "tiny-llama"
    assert r.train.global_batch_size == 8 and r.train.micro_batch_size == 4
    assert type(r.train.num_epochs) is float and r.train.num_epochs == 1.0  # int 1 widened to float
    assert r.train.learning_rate == pytest.approx(3.0e-3)
    assert r.deepspeed.zero_stage == 2
    assert batch_layout(r.train, 1).grad_accum_steps == 2
    assert batch_layout(r.train, 2).grad_accum_steps == 1


# ---------------------------------------------------------------------------
# unknown keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "delta, dotted, suggestion",
    [
        ({"train": {"learnig_rate": 1e-4}}, "train.learnig_rate", "learning_rate"),
        ({"seeds": 1}, "seeds", "seed"),
        ({"deepspeed": {"zero_stag": 2}}, "deepspeed.zero_stag", "zero_stage"),
        ({"sft": {"gold_eval": {"num_promts": 3}}}, "sft.gold_eval.num_promts", "num_prompts"),
    ],
)
def test_unknown_key_names_dotted_key_and_suggests(tmp_path, delta, dotted, suggestion):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, delta)
    msg = str(info.value)
    assert f"'{dotted}'" in msg
    assert f"Did you mean '{suggestion}'?" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, {"deepspeed": {"zzzzzz": 1}})
    msg = str(info.value)
    assert "'deepspeed.zzzzzz'" in msg and "zero_stage" in msg and "offload_params" in msg


# ---------------------------------------------------------------------------
# wrong types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "delta, dotted",
    [
        ({"train": {"max_steps": "3"}}, "train.max_steps"),  # string for an (optional) int
        ({"seed": "42"}, "seed"),  # string for an int
        ({"train": {"micro_batch_size": 2.0}}, "train.micro_batch_size"),  # float for an int
        ({"train": {"max_steps": 3.5}}, "train.max_steps"),
        ({"model": {"gradient_checkpointing": 1}}, "model.gradient_checkpointing"),  # int for a bool
        ({"lora": {"enabled": 0}}, "lora.enabled"),
        ({"train": {"warmup_steps": True}}, "train.warmup_steps"),  # bool for an int
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),  # string for a float
        ({"train": {"precision": "bf32"}}, "train.precision"),  # not one of the literals
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules"),  # string for a list
        ({"lora": {"target_modules": ["q_proj", 3]}}, "lora.target_modules[1]"),
        ({"train": 5}, "train"),  # scalar for a section
    ],
)
def test_wrong_type_names_the_key(tmp_path, delta, dotted):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, delta)
    assert f"{dotted}:" in str(info.value)


def test_int_widens_to_float_but_not_the_reverse(tmp_path):
    r = _load(tmp_path, {"train": {"learning_rate": 1, "num_epochs": 2}})
    assert type(r.train.learning_rate) is float and r.train.learning_rate == 1.0
    assert type(r.train.num_epochs) is float and r.train.num_epochs == 2.0
    r = _load(tmp_path, {"train": {"max_steps": 7}})
    assert type(r.train.max_steps) is int and r.train.max_steps == 7


def test_exponent_without_dot_is_a_number(tmp_path):
    r = load_recipe(_write(tmp_path), "sft", ["train.learning_rate=1e-4"])
    assert r.train.learning_rate == pytest.approx(1e-4)


def test_exponent_without_dot_in_file(tmp_path):
    path = _write(tmp_path, raw=yaml.safe_dump(_base(tmp_path)) + "train:\n  learning_rate: 1e-5\n")
    assert load_recipe(path, "sft").train.learning_rate == pytest.approx(1e-5)


# ---------------------------------------------------------------------------
# batch arithmetic
# ---------------------------------------------------------------------------


def test_global_not_multiple_of_micro_fails_at_load(tmp_path):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, {"train": {"global_batch_size": 10, "micro_batch_size": 4}})
    msg = str(info.value)
    assert "train.global_batch_size (10)" in msg and "train.micro_batch_size (4)" in msg


def test_batch_layout_world_size_mismatch():
    train = TrainConfig(global_batch_size=8, micro_batch_size=2)
    with pytest.raises(RecipeError) as info:
        batch_layout(train, world_size=3)
    assert "2 x 3 = 6" in str(info.value)


@pytest.mark.parametrize(
    "world, glob, micro, accum",
    [(2, 16, 2, 4), (1, 16, 2, 8), (4, 16, 2, 2), (8, 16, 2, 1), (1, 8, 8, 1), (3, 12, 4, 1)],
)
def test_batch_layout_values(world, glob, micro, accum):
    layout = batch_layout(TrainConfig(global_batch_size=glob, micro_batch_size=micro), world_size=world)
    assert (layout.global_batch_size, layout.micro_batch_size, layout.grad_accum_steps, layout.world_size) == (
        glob, micro, accum, world)


def test_batch_layout_too_many_ranks():
    with pytest.raises(RecipeError):
        batch_layout(TrainConfig(global_batch_size=8, micro_batch_size=4), world_size=4)


@pytest.mark.parametrize("delta", [{"train": {"micro_batch_size": 0}}, {"train": {"global_batch_size": 0}}])
def test_zero_batch_sizes_fail(tmp_path, delta):
    with pytest.raises(RecipeError, match="must be >= 1"):
        _load(tmp_path, delta)


# ---------------------------------------------------------------------------
# cross-field contradictions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "delta, needle",
    [
        ({"deepspeed": {"zero_stage": 2, "offload_params": True}}, "deepspeed.offload_params"),
        ({"deepspeed": {"zero_stage": 0, "offload_params": True}}, "deepspeed.offload_params"),
        ({"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, "deepspeed.offload_optimizer"),
        ({"data": {"eval": "builtin:sft_eval", "eval_fraction": 0.1}}, "data.eval or data.eval_fraction"),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
        ({"data": {"max_length": 4}}, "data.max_length"),
        ({"train": {"max_steps": 0}}, "train.max_steps"),
        ({"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
        ({"train": {"log_interval": 0}}, "train.log_interval"),
        ({"data": {"packing": True}, "model": {"attn_implementation": "flash_attention_2"}}, "data.packing needs"),
        ({"sft": {"share_prefix": True}, "model": {"attn_implementation": "flash_attention_2"}}, "sft.share_prefix needs"),
    ],
)
def test_contradictions_fail(tmp_path, delta, needle):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, delta)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "delta",
    [
        {"deepspeed": {"zero_stage": 3, "offload_params": True, "offload_optimizer": True}},
        {"deepspeed": {"zero_stage": 1, "offload_optimizer": True}},
        {"data": {"eval": "builtin:sft_eval"}},
        {"data": {"eval_fraction": 0.1}},
        {"data": {"packing": True}, "model": {"attn_implementation": "sdpa"}},
        {"data": {"packing": True}, "model": {"attn_implementation": "eager"}},
    ],
)
def test_consistent_combinations_load(tmp_path, delta):
    _load(tmp_path, delta)


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, {"deepspeed": {"zero_stage": 0, "offload_params": True, "offload_optimizer": True}})
    msg = str(info.value)
    assert "offload_params" in msg and "offload_optimizer" in msg


# ---------------------------------------------------------------------------
# --set overrides and required keys
# ---------------------------------------------------------------------------


def test_overrides_apply_with_types():
    r = load_recipe(
        REPO / "configs/tiny/sft.yaml",
        "sft",
        overrides=[
            "train.max_steps=3",
            "deepspeed.zero_stage=3",
            "train.learning_rate=0.5",
            "lora.enabled=true",
            "lora.target_modules=[q_proj, v_proj]",
            "data.eval=null",
            "model.name_or_path=/some/dir",
            "train.num_epochs=2",
        ],
    )
    assert type(r.train.max_steps) is int and r.train.max_steps == 3
    assert type(r.deepspeed.zero_stage) is int and r.deepspeed.zero_stage == 3
    assert r.train.learning_rate == 0.5
    assert r.lora.enabled is True
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.eval is None
    assert r.model.name_or_path == "/some/dir"
    assert type(r.train.num_epochs) is float and r.train.num_epochs == 2.0
    # untouched keys keep the file's values
    assert r.train.global_batch_size == 8 and r.train.warmup_steps == 2


def test_later_override_wins():
    r = load_recipe(REPO / "configs/tiny/sft.yaml", "sft", ["train.max_steps=3", "train.max_steps=5"])
    assert r.train.max_steps == 5


@pytest.mark.parametrize(
    "override, dotted, suggestion",
    [
        ("train.learnig_rate=1", "train.learnig_rate", "learning_rate"),
        ("sed=1", "sed", "seed"),
        ("deepspeed.zero_stages=3", "deepspeed.zero_stages", "zero_stage"),
    ],
)
def test_override_unknown_key(override, dotted, suggestion):
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "configs/tiny/sft.yaml", "sft", [override])
    msg = str(info.value)
    assert f"'{dotted}'" in msg and f"Did you mean '{suggestion}'?" in msg


@pytest.mark.parametrize(
    "override, dotted",
    [("train.max_steps=three", "train.max_steps"), ("train.max_steps=2.5", "train.max_steps"),
     ("lora.enabled=1", "lora.enabled"), ("train.precision=bf8", "train.precision")],
)
def test_override_wrong_type(override, dotted):
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "configs/tiny/sft.yaml", "sft", [override])
    assert f"{dotted}:" in str(info.value)


def test_override_contradiction_fails():
    with pytest.raises(RecipeError, match="deepspeed.offload_params"):
        load_recipe(REPO / "configs/tiny/sft.yaml", "sft", ["deepspeed.offload_params=true"])


def test_override_without_equals():
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(REPO / "configs/tiny/sft.yaml", "sft", ["train.max_steps"])


def test_override_into_scalar_is_not_a_section():
    with pytest.raises(RecipeError, match="train.learning_rate"):
        load_recipe(REPO / "configs/tiny/sft.yaml", "sft", ["train.learning_rate.x=1"])


def test_override_into_empty_section(tmp_path):
    path = _write(tmp_path, raw=yaml.safe_dump(_base(tmp_path)) + "lora:\n")
    assert load_recipe(path, "sft").lora.enabled is False  # an empty section loads as defaults
    r = load_recipe(path, "sft", ["lora.enabled=true"])
    assert r.lora.enabled is True


def test_missing_required_keys_without_recipe():
    with pytest.raises(RecipeError) as info:
        load_recipe(None, "sft")
    msg = str(info.value)
    for key in ("output_dir", "model.name_or_path", "data.train"):
        assert key in msg


def test_missing_required_key_in_file(tmp_path):
    path = _write(tmp_path, raw="output_dir: /tmp/x\ndata:\n  train: a.jsonl\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, "sft")
    msg = str(info.value)
    assert "model.name_or_path" in msg and "output_dir" not in msg.split("not set:")[1]


def test_required_keys_from_overrides_only():
    r = load_recipe(None, "sft", ["output_dir=/tmp/o", "model.name_or_path=tiny-llama", "data.train=x.jsonl"])
    assert isinstance(r, SFTRecipe) and r.output_dir == "/tmp/o" and r.data.train == "x.jsonl"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml", "sft")
    bad = _write(tmp_path, raw="train: [unclosed\n", name="bad.yaml")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad, "sft")
    listy = _write(tmp_path, raw="- a\n- b\n", name="list.yaml")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(listy, "sft")


# ---------------------------------------------------------------------------
# LR schedule and DeepSpeed config
# ---------------------------------------------------------------------------


def _lr():
    from alignment.core.engine import lr_lambda

    return lr_lambda


def test_lr_warmup_is_linear():
    fn = _lr()(total_steps=20, warmup_steps=4, schedule="cosine", min_lr_ratio=0.0)
    assert [fn(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-12)
    assert fn(4) == pytest.approx(1.0, abs=1e-12)  # decay starts from the peak


def test_lr_cosine_values():
    fn = _lr()(total_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    # decay over 8 steps: f(2 + k) = 0.1 + 0.9 * 0.5 * (1 + cos(pi k / 8))
    assert fn(0) == pytest.approx(0.5, abs=1e-12)
    assert fn(1) == pytest.approx(1.0, abs=1e-12)
    assert fn(2) == pytest.approx(1.0, abs=1e-12)
    assert fn(4) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)), abs=1e-12)  # 0.868198
    assert fn(4) == pytest.approx(0.8681980515, abs=1e-9)
    assert fn(6) == pytest.approx(0.55, abs=1e-12)  # half way
    assert fn(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)), abs=1e-12)
    assert fn(10) == pytest.approx(0.1, abs=1e-12)  # reaches min_lr_ratio at the end
    assert fn(25) == pytest.approx(0.1, abs=1e-12)  # and stays there
    values = [fn(s) for s in range(2, 11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_lr_linear_values():
    fn = _lr()(total_steps=10, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [fn(s) for s in (0, 1, 5, 9, 10, 12)] == pytest.approx([1.0, 0.9, 0.5, 0.1, 0.0, 0.0], abs=1e-12)
    fn = _lr()(total_steps=12, warmup_steps=2, schedule="linear", min_lr_ratio=0.2)
    # decay over 10 steps: f(2 + k) = 0.2 + 0.8 * (1 - k / 10)
    assert [fn(s) for s in (0, 1, 2, 3, 7, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.92, 0.6, 0.2], abs=1e-12)


def test_lr_constant():
    fn = _lr()(total_steps=10, warmup_steps=3, schedule="constant", min_lr_ratio=0.5)
    assert [fn(s) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0], abs=1e-12)
    assert fn(100) == 1.0


def test_deepspeed_config_from_layout():
    from alignment.core.engine import build_deepspeed_config

    r = load_recipe(REPO / "configs/tiny/sft.yaml", "sft")
    layout = batch_layout(r.train, 2)
    cfg = build_deepspeed_config(r.train, r.deepspeed, layout, on_gpu=False)
    assert cfg["train_batch_size"] == 8
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_batch_size"] == (
        cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * layout.world_size)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # recipe says fp32
    assert cfg["gradient_clipping"] == 1.0
    assert "offload_optimizer" not in cfg["zero_optimization"] and "optimizer" not in cfg

    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True)
    train = TrainConfig(global_batch_size=16, micro_batch_size=2, precision="bf16", max_grad_norm=0.0,
                        learning_rate=2e-4)
    cfg = build_deepspeed_config(train, ds, batch_layout(train, 2), on_gpu=False)
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] is True and cfg["torch_autocast"]["enabled"] is False
    # bf16-mixed: fp32 weights and optimizer (no DeepSpeed bf16), the forward under torch.autocast(bf16).
    mixed = build_deepspeed_config(TrainConfig(precision="bf16-mixed"), ds, batch_layout(train, 2), on_gpu=False)
    assert mixed["bf16"]["enabled"] is False and mixed["fp16"]["enabled"] is False
    assert mixed["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "gradient_clipping" not in cfg
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["optimizer"]["params"]["lr"] == 2e-4


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _cli(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    env["ALIGN_CACHE"] = str(tmp_path / "cache")
    env.setdefault("WANDB_MODE", "disabled")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def test_cli_bad_override_exits_2_quickly(tmp_path):
    out = tmp_path / "run"
    proc, elapsed = _cli(["sft", "configs/tiny/sft.yaml", "--set", f"output_dir={out}",
                          "--set", "train.learnig_rate=1"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "train.learnig_rate" in proc.stderr and "Did you mean 'learning_rate'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, f"recipe error took {elapsed:.1f}s"
    # nothing was built or written: no model in the (fresh) cache, no output directory
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.name.startswith("tiny-llama") for p in cache.iterdir())
    assert not out.exists()


@pytest.mark.parametrize("args", [["--help"], ["sft", "--help"]])
def test_cli_help(args, tmp_path):
    proc, _ = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    if args == ["--help"]:
        assert "sft" in proc.stdout
    else:
        assert "--set" in proc.stdout and "recipe" in proc.stdout


@pytest.mark.parametrize("sets, message", [
    (["pairs.enabled=true", "pairs.judge=oracle"], "pairs.judge must be 'gold' or 'rm'"),
    (["pairs.enabled=true", "pairs.judge=rm", "rm.enabled=false"], "needs the rm stage enabled"),
    (["pairs.enabled=true", "dpo.enabled=false"], "enable sft and dpo"),
    (["pairs.enabled=true", "pairs.samples=1"], "at least 2"),
    (["pairs.enabled=true", "pairs.chosen=reference", "pairs.judge=rm"], "set pairs.judge 'gold'"),
])
def test_pipeline_pairs_stage_cross_checks(sets, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(REPO / "configs" / "smollm2" / "pipeline.yaml", "pipeline", sets)
    # the same recipe without the pairs stage is fine
    load_recipe(REPO / "configs" / "smollm2" / "pipeline.yaml", "pipeline", [s for s in sets if "pairs.enabled" not in s])


def test_pipeline_pairs_chosen_is_best_or_reference():
    with pytest.raises(RecipeError, match="pairs.chosen: 'oracle' is not one of 'best', 'reference'"):
        load_recipe(REPO / "configs" / "smollm2" / "pipeline.yaml", "pipeline", ["pairs.chosen=oracle"])


def test_removed_option_is_an_unknown_key(tmp_path):
    """train.dataloader_workers did nothing; a recipe naming it now fails instead of being ignored."""
    with pytest.raises(RecipeError, match="unknown key 'train.dataloader_workers'"):
        _load(tmp_path, {"train": {"dataloader_workers": 4}})


def test_stage_checks_run_when_a_recipe_loads():
    """Each stage's own cross-field checks run in load_recipe (before any model loads, in the pipeline too)."""
    with pytest.raises(RecipeError, match="dpo.reference: adapter needs lora.enabled"):
        load_recipe(REPO / "configs" / "tiny" / "dpo.yaml", "dpo", ["dpo.reference=adapter"])
    with pytest.raises(RecipeError, match="rm.max_prompt_length must be between"):
        load_recipe(REPO / "configs" / "tiny" / "rm.yaml", "rm", ["rm.max_prompt_length=500"])


def test_a_stage_module_that_fails_to_import_is_not_reported_as_not_implemented(monkeypatch, capsys):
    from alignment import cli, stages

    monkeypatch.setitem(stages.MODULES, "dpo", "alignment.stages.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        cli.main(["dpo", str(REPO / "configs" / "tiny" / "dpo.yaml")])
    assert "not implemented" not in capsys.readouterr().err


def test_pipeline_nproc_and_dry_run(capsys):
    from alignment import cli

    assert cli.main(["pipeline", str(REPO / "configs" / "tiny" / "pipeline.yaml"), "--nproc", "2", "--dry-run",
                     "--set", "output_dir=/tmp/never-written"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert [c.split()[1] for c in commands] == ["sft", "rm", "dpo"]
    assert all("--nproc 2" in c for c in commands), commands
    assert "model.name_or_path=/tmp/never-written/sft/final" in commands[2]
    assert not Path("/tmp/never-written").exists()


def test_pipeline_online_dpo_rounds_chain_policies(capsys):
    """Round k samples pairs from round k-1's DPO policy (round 1: SFT's), trains DPO from it on those
    pairs with new prompts; the last round is dpo/, which PPO starts from."""
    from alignment import cli

    out = "/tmp/never-written-rounds"
    assert cli.main(["pipeline", str(REPO / "configs" / "tiny" / "pipeline.yaml"), "--dry-run", "--set",
                     f"output_dir={out}", "--set", "pairs.enabled=true", "--set", "pairs.rounds=3",
                     "--set", "ppo.enabled=true"]) == 0
    commands = [c.split() for c in capsys.readouterr().out.strip().splitlines()]
    assert [c[1] for c in commands] == ["sft", "rm", "pairs", "dpo", "pairs", "dpo", "pairs", "dpo", "ppo"]

    def arg(c, flag):
        return c[c.index(flag) + 1]

    def setting(c, key):
        return next(v.split("=", 1)[1] for v in c if v.startswith(key + "="))

    pairs, dpos = commands[2:8:2], commands[3:8:2]
    assert [arg(p, "--model") for p in pairs] == [f"{out}/sft/final", f"{out}/dpo-round1/final",
                                                   f"{out}/dpo-round2/final"]  # tiny recipes: full fine-tunes
    assert [arg(p, "--out") for p in pairs] == [f"{out}/pairs-round1/pairs.jsonl", f"{out}/pairs-round2/pairs.jsonl",
                                                 f"{out}/pairs/pairs.jsonl"]
    assert [arg(p, "--offset") for p in pairs] == ["0", "256", "512"]  # consecutive slices of one shuffle
    assert [arg(p, "--chosen") for p in pairs] == ["best"] * 3
    for p, d in zip(pairs, dpos):
        assert setting(d, "model.name_or_path") == arg(p, "--model")
        assert setting(d, "data.train") == arg(p, "--out")
    assert setting(commands[-1], "model.name_or_path") == f"{out}/dpo/final"
    assert not Path(out).exists()


def test_ppo_forward_batch_size_takes_whole_groups():
    """Step 3's no-grad forwards pack each group with its prompt once: a chunk that splits a group is refused."""
    from alignment import stages
    from alignment.core.recipes import load_recipe

    stages.load("ppo")
    K = load_recipe("configs/tiny/grpo.yaml", "ppo", []).ppo.samples_per_prompt
    assert load_recipe("configs/tiny/grpo.yaml", "ppo", [f"ppo.forward_batch_size={3 * K}"]).ppo.forward_batch_size == 3 * K
    with pytest.raises(RecipeError, match="forward_batch_size"):
        load_recipe("configs/tiny/grpo.yaml", "ppo", [f"ppo.forward_batch_size={K + 1}"])


# ---------------------------------------------------------------------------
# train.precision: auto resolves to what the device runs fast
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("native, requested, expected, note", [
    (True, "auto", "bf16", "auto -> bf16"),
    (False, "auto", "fp32", "auto -> fp32"),
    (True, "bf16", "bf16", None),
    (False, "bf16", "bf16", "warning: train.precision bf16"),  # kept as asked, with a warning
    (False, "fp32", "fp32", None),
    (True, "bf16-mixed", "bf16-mixed", None),
    (False, "bf16-mixed", "bf16-mixed", "warning: train.precision bf16-mixed"),
])
def test_precision_auto_resolves_when_the_recipe_loads(tmp_path, monkeypatch, capsys, native, requested, expected,
                                                       note):
    import alignment.core.config as config
    import alignment.core.precision as distributed  # where resolve_precision reads native_bf16

    monkeypatch.setattr(distributed, "native_bf16", lambda: (native, "this CPU (TEST) says so"))
    monkeypatch.setattr(config, "_PRECISION_NOTES", set())
    recipe = _load(tmp_path, {"train": {"precision": requested}})
    assert recipe.train.precision == expected
    err = capsys.readouterr().err
    if note:
        assert note in err and "this CPU (TEST) says so" in err
    else:
        assert "train.precision" not in err


def test_precision_defaults_to_auto_and_the_real_device_resolves_it(tmp_path):
    from alignment.core.precision import native_bf16

    assert TrainConfig().precision == "auto"
    recipe = _load(tmp_path)  # the base recipe does not set train.precision
    assert recipe.train.precision == ("bf16" if native_bf16()[0] else "fp32")


def test_skip_rows_leaves_out_the_first_rows_before_max_rows(tmp_path):
    """data.skip_rows: a later pipeline stage reading the same file trains on rows an earlier stage never saw."""
    from alignment.data.sources import DataError
    from alignment.data.sources import read_splits

    train = tmp_path / "train.jsonl"
    train.write_text("".join(f'{{"messages": [{{"role": "user", "content": "q{i}"}}, '
                             f'{{"role": "assistant", "content": "a{i}"}}]}}\n' for i in range(10)))
    base = ["model.name_or_path=tiny-llama", f"data.train={train}", "data.eval=null"]
    recipe = load_recipe(CONFIG_DIR / "tiny" / "sft.yaml", "sft", base + ["data.skip_rows=6", "data.max_rows=3"])
    rows, _ = read_splits(recipe.data, recipe.seed)
    assert [r.data["messages"][0]["content"] for r in rows] == ["q6", "q7", "q8"]
    recipe = load_recipe(CONFIG_DIR / "tiny" / "sft.yaml", "sft", base + ["data.skip_rows=10"])
    with pytest.raises(DataError, match=r"train.jsonl: data.skip_rows \(10\) leaves none of its 10 training rows"):
        read_splits(recipe.data, recipe.seed)
    with pytest.raises(RecipeError, match="data.skip_rows must be >= 0"):
        load_recipe(CONFIG_DIR / "tiny" / "sft.yaml", "sft", base + ["data.skip_rows=-1"])
