"""Training stages, one module each (the reward model's lives in reward/train.py), each reading as its algorithm's
numbered steps; tail.py is what every stage does around its loop. Recipe schemas: alignment.core.recipes."""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {"sft": "alignment.stages.sft", "rm": "reward.train", "dpo": "alignment.stages.dpo",
           "kto": "alignment.stages.kto", "ppo": "alignment.stages.ppo"}


def load(name: str) -> ModuleType:
    """The module of training stage `name`, imported (a module that fails to import raises as it is)."""
    return importlib.import_module(MODULES[name])
