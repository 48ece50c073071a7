"""Stage lineage: `output_dir/manifest.json`, what a run was made from and whether it finished.

Every training stage writes it when it starts (`complete: false`) and again when `final/` is
exported and verified (`complete: true`, with the final metrics). Its `inputs` are what the
result depends on: a hash of the resolved recipe (without output_dir and logging) and a
fingerprint of every data file and model directory the recipe names (a hub model at its pinned
commit). `align pipeline` skips a stage whose manifest says it finished with the same inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from alignment.core.fingerprint import file_fingerprint, model_fingerprint
from alignment.core.models import BUILTIN_MODELS, resolve_model_path
from alignment.data.sources import resolve_source

MANIFEST = "manifest.json"
_NOT_INPUTS = ("output_dir", "logging")


def _strings(value: Any, where: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def _fingerprint_of(where: str, value: str, revision: str | None) -> str | None:
    """The fingerprint of the data file or model a recipe string names (built-in names and, for
    model.name_or_path, hub ids at their pinned commit included); None for any other string."""
    if value in BUILTIN_MODELS:
        return model_fingerprint(resolve_model_path(value))
    path = Path(resolve_source(value)).expanduser()
    if path.is_file():
        return file_fingerprint(path)
    if path.is_dir() and (path / "config.json").is_file():
        return model_fingerprint(str(path))
    if where == "model.name_or_path":
        return model_fingerprint(value, revision) or f"hub:{value}@{revision or 'main'} (not pinned)"
    return None


def stage_inputs(recipe) -> dict:
    """What a stage's result depends on: {"recipe": sha256 of the resolved recipe, "settings": its dotted keys and
    values (to name what changed), "files": {dotted key: fingerprint}}."""
    resolved = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in _NOT_INPUTS}
    recipe_hash = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()
    revision = getattr(getattr(recipe, "model", None), "revision", None)
    files = {}
    for where, value in _strings(resolved):
        fingerprint = _fingerprint_of(where, value, revision)
        if fingerprint is not None:
            files[where] = fingerprint
    settings = {where: value for where, value in _leaves(resolved)}
    return {"recipe": recipe_hash, "settings": settings, "files": files}


def _leaves(value: Any, where: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{where}.{key}" if where else key)
    else:
        yield where, value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value,
                                                                                                          default=str)


def read(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write(output_dir: str | Path, stage: str, inputs: dict, info: dict, complete: bool,
          final_metrics: dict | None = None) -> None:
    manifest = {"stage": stage, "complete": complete, "inputs": inputs,
                "git_revision": info.get("git_revision"), "versions": info.get("versions"),
                "world_size": info.get("world_size"), "seed": info.get("seed"), "started": info.get("started"),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S") if complete else None,
                "final_metrics": final_metrics or {}}
    path = Path(output_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(path)


def changed(before: dict, now: dict) -> list[str]:
    """Which inputs differ: 'recipe' and/or the dotted keys of files whose fingerprint changed."""
    out = ["recipe"] if before.get("recipe") != now.get("recipe") else []
    old, new = before.get("files", {}), now.get("files", {})
    out += sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return out


def differences(before: dict, now: dict) -> list[str]:
    """What differs, in detail: each recipe key whose value changed (`key: old -> new`), and each data file or
    model whose contents changed (`key: contents changed`); a manifest older than its settings says 'recipe'."""
    out = []
    if before.get("recipe") != now.get("recipe"):
        old, new = before.get("settings"), now.get("settings", {})
        if old is None:
            out.append("recipe")
        else:
            out += [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
    named = {item.split(":")[0] for item in out}
    old, new = before.get("files", {}), now.get("files", {})
    out += sorted(f"{k}: contents changed" for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in named)
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 100 else "..." + text[-97:]  # a path's end says the most
