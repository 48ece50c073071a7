"""The project's built-in task and models, registered with the core by name.

- task: short, program-checkable chat problems and their verifier (the gold reward);
- models: ``smollm2-135m`` and ``tiny-llama`` (``model.name_or_path``), built once into the cache.

Data (``data.train: builtin:NAME``): the built-in task's files, written once per format version into the
cache. Importing ``alignment`` registers these (``alignment/__init__.py``).
"""

from __future__ import annotations

from pathlib import Path

from alignment.builtin import task
from alignment.builtin.models import build_smollm2, build_tiny_llama
from alignment.core.models import build_once, register_builtin_model
from alignment.data.sources import DataError, register_source


def task_data_dir(seed: int = 0) -> Path:
    """The built-in task's files, generated once per seed into the cache."""
    # Keyed by the task format version, so a changed generator never serves stale files.
    version = task.FORMAT_VERSION.rsplit("/", 1)[-1]
    return build_once(f"task-data-seed{seed}-{version}", lambda out: task.write_task_data(out, seed=seed))


def resolve_builtin_data(name: str) -> str:
    path = task_data_dir() / f"{name}.jsonl"
    if not path.is_file():
        choices = sorted(p.stem for p in task_data_dir().glob("*.jsonl"))
        raise DataError(f"unknown built-in data 'builtin:{name}'; choose from: "
                        f"{', '.join('builtin:' + c for c in choices)}")
    return str(path)


register_builtin_model("smollm2-135m", "smollm2-135m-instruct-v1", build_smollm2)
register_builtin_model("tiny-llama", "tiny-llama-v1", build_tiny_llama)
register_source("builtin", resolve_builtin_data)
