"""Shared fixtures: a private model/data cache per test session, repo paths."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "harmless-base-test.jsonl"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # `from helpers import ...` from every test folder
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, for the worker and the runs it starts.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def pytest_report_header(config):
    if not SHARED_HH.exists():
        return (f"NOTE: the shared hh-rlhf data is missing ({SHARED_HH}): the real-data tests that need it are "
                "skipped (see the skip reasons in the summary)")
    return f"real data: {SHARED_HH}"


@pytest.fixture(scope="session")
def hh_path() -> Path:
    if not SHARED_HH.exists():
        pytest.skip(f"shared hh-rlhf data not found at {SHARED_HH}")
    return SHARED_HH


HEAVY_FIRST = ("tests/test_real_model.py", "tests/test_pipeline_e2e.py", "tests/stages/test_pref_distributed.py")


def pytest_collection_modifyitems(config, items):
    """Longest files first: under `-n 2 --dist loadfile` a worker takes a whole file, so the real-model file
    (several SmolLM2 runs) must not be the last one left while the other worker idles."""
    def rank(item):
        path = Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
        return HEAVY_FIRST.index(path) if path in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order inside a file is kept
