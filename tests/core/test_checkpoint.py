"""Checkpoint and cache files hold data, never code: RNG state as JSON + safetensors, the reference
table and the export's expected outputs as safetensors; nothing in the package unpickles a file."""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from alignment.core.checkpoint import load_rng_state, save_rng_state

PACKAGE = Path(__file__).resolve().parents[2]


def test_rng_state_round_trips_through_json_and_safetensors(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # states mid-stream, not just seeded
    save_rng_state(tmp_path, 0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state(tmp_path, 0)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng_rank00000.json", "rng_rank00000.safetensors"]
    json.loads((tmp_path / "rng_rank00000.json").read_text())


def test_the_package_never_unpickles_a_file():
    """torch.load without weights_only=True, pickle.load and friends would run whatever a file holds."""
    pattern = re.compile(r"torch\.load\((?![^)]*weights_only=True)|pickle\.loads?\(|joblib\.load\(")
    hits = [f"{path.relative_to(PACKAGE)}:{n}" for folder in ("alignment", "reward") for path in (PACKAGE / folder).rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


class _Payload:
    """Unpickling this writes a file: proof that a load executed code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("executed",))


def test_a_poisoned_reference_cache_is_a_miss_not_an_execution(tmp_path):
    from alignment.stages.dpo import read_reference_cache, write_reference_cache

    marker = tmp_path / "marker"
    path = tmp_path / "ref.safetensors"
    path.write_bytes(pickle.dumps({"train": _Payload(str(marker))}))
    assert read_reference_cache(path, "k", {"train": [object()]}) is None
    assert not marker.exists()
    table = {"train": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    write_reference_cache(path, "k", table)
    assert torch.equal(read_reference_cache(path, "k", {"train": [0, 1]})["train"], table["train"])
    assert read_reference_cache(path, "other-key", {"train": [0, 1]}) is None
    assert read_reference_cache(path, "k", {"train": [0, 1, 2]}) is None, "a table for other pairs is a miss"
