"""The built-in model cache (alignment.core.models.build_once): every entry marked complete is whole
(config, weights, tokenizer), whichever rank of a job built it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, child_env
from alignment.core.distributed import free_port


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cold_cache_built_by_rank_1_is_whole(tmp_path):
    """transformers 5 writes save_pretrained files only on torch.distributed rank 0: a rank-1 build used
    to leave a tokenizer without config.json or weights, marked complete, and every later run failed."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "core" / "cache_probe.py"), str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=child_env({"ALIGN_CACHE": str(cache)}), capture_output=True,
                            text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    facts = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, seen in enumerate(facts):
        assert "error" not in seen, f"rank {rank}: {seen}"
        assert seen["layers"] == 2
        assert {"config.json", "model.safetensors", "tokenizer.json", ".complete"} <= set(seen["files"]), seen
    assert facts[0]["path"] == facts[1]["path"]


def test_entry_marked_complete_but_not_whole_is_rebuilt(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignment.core.models import resolve_model_path

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    path = Path(resolve_model_path("tiny-llama"))
    for name in ("config.json", "model.safetensors"):  # what a rank-1 build used to leave out
        (path / name).unlink()
    assert (path / ".complete").exists()
    again = Path(resolve_model_path("tiny-llama"))
    assert again == path and (again / "config.json").is_file() and (again / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(again).config.num_hidden_layers == 2


def test_a_builder_that_writes_no_weights_is_an_error(tmp_path, monkeypatch):
    from alignment.core.models import build_once, model_dir_problems

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))

    def tokenizer_only(out: Path) -> None:
        (out / "tokenizer.json").write_text("{}")

    with pytest.raises(RuntimeError, match="config.json"):
        build_once("broken-model", tokenizer_only, check=model_dir_problems)
    assert not (tmp_path / "broken-model").exists(), "nothing is marked complete"
