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
