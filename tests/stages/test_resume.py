"""Resume for every training stage (SFT, RM, DPO): from a checkpoint saved at an epoch's last step and at
steps either side of it, a resumed run logs the same steps and ends with the same weights as an
uninterrupted one; a run whose data order would differ is refused (FAILURES rows 17, 18)."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import align_cache, load_safetensors_dir, run_cli, step_metrics  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RECIPES = {"sft": "configs/tiny/sft.yaml", "rm": "configs/tiny/rm.yaml", "dpo": "configs/tiny/dpo.yaml"}
# 32 examples in global batches of 8: 4 steps an epoch, 2 epochs, a checkpoint after every step.
SETS = ("train.precision=fp32", "logging.progress_bar=false", "data.max_rows=32", "data.eval=null",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.num_epochs=2", "train.max_steps=null",
        "train.save_interval=1", "train.keep_checkpoints=10", "train.eval_interval=0", "train.warmup_steps=2")


def stage_args(stage: str, out, *extra: str, resume: bool = False) -> list[str]:
    args = [stage, RECIPES[stage], "--set", f"output_dir={out}"]
    for item in SETS + extra:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


@pytest.fixture(scope="module", params=sorted(RECIPES))
def uninterrupted(request, tmp_path_factory, align_cache):
    stage = request.param
    out = tmp_path_factory.mktemp(f"resume-{stage}") / "A"
    run_cli(stage_args(stage, out)).check()
    steps = step_metrics(out)
    assert sorted(steps) == list(range(1, 9)), "2 epochs x 4 steps"
    assert steps[4]["train/epoch"] == pytest.approx(0.75) and steps[5]["train/epoch"] == pytest.approx(1.0)
    return stage, out


def interrupted_at(source, dest, step: int):
    """What a run killed after checkpointing `step` leaves: checkpoints up to it, no final/."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("final", ".final-expected.safetensors"))
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


@pytest.mark.parametrize("at", [3, 4, 5])
def test_resume_is_exact_at_and_around_an_epoch_boundary(tmp_path, uninterrupted, at):
    stage, source = uninterrupted
    out = tmp_path / "B"
    interrupted_at(source, out, at)
    result = run_cli(stage_args(stage, out, resume=True)).check()
    assert f"step-{at:08d}" in result.output, "resumed from the newest checkpoint"
    a, b = step_metrics(source), step_metrics(out)
    assert sorted(b) == list(range(1, 9)), f"each step once; resumed at {at}: {sorted(b)}"
    for s in range(at + 1, 9):
        for key in ("loss", "train/lr", "train/grad_norm", "train/epoch"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-6, abs=1e-12), f"step {s} {key}"
    expected, got = load_safetensors_dir(source / "final"), load_safetensors_dir(out / "final")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# Every cause on SFT; each other stage with one (they share the check).
CHANGES = {"sft": ("data.max_rows=24", "train.global_batch_size=4", "seed=7"), "rm": ("data.max_rows=24",),
           "dpo": ("train.global_batch_size=4",)}


def test_resume_refuses_a_changed_data_order(tmp_path, uninterrupted):
    stage, source = uninterrupted
    for i, change in enumerate(CHANGES[stage]):
        out = tmp_path / f"C{i}"
        interrupted_at(source, out, 4)
        result = run_cli(stage_args(stage, out, change, resume=True))
        assert result.returncode == 2, (change, result.output[-2000:])
        assert "data order changed" in result.output and "step-00000004" in result.output, result.output[-3000:]
        assert "Traceback" not in result.output and not (out / "final").exists()
