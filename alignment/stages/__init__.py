"""Training stages, one module each (reward models live in reward/); importing a stage's module
registers its recipe schema and checks with alignment.core.config."""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {"sft": "alignment.stages.sft", "rm": "reward.train", "dpo": "alignment.stages.dpo",
           "ppo": "alignment.stages.ppo"}


def load(name: str) -> ModuleType:
    """The module of training stage `name`, imported (a module that fails to import raises as it is)."""
    return importlib.import_module(MODULES[name])
