"""Checkpoint I/O: atomic `checkpoints/step-N/` directories a run resumes from exactly.

A checkpoint holds, for every trainable model of the stage (by name: `policy`, `critic`, ...),
DeepSpeed's own state (weights, optimizer, LR schedule), plus per-rank RNG state and the
stage's trainer state (step, data position). It is written under a `.partial` name and
renamed only when complete: only directories with `checkpoint.json` count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from alignment.core.distributed import set_seed

CHECKPOINT_DONE = "checkpoint.json"


def save_checkpoint(engine, root: Path, models: dict, trainer_state: dict, keep: int) -> Path:
    """Write root/step-N for `models` (name -> DeepSpeed engine); collective: every rank calls."""
    dist = engine.dist
    step = trainer_state["step"]
    final = Path(root) / f"step-{step:08d}"
    partial = Path(root) / f".step-{step:08d}.partial"
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    for name, model in models.items():
        model.save_checkpoint(str(partial), tag=name, client_state={}, save_latest=False)
    save_rng_state(partial, dist.rank)
    dist.barrier()
    if dist.is_main:
        state = dict(trainer_state, world_size=dist.world_size, models=sorted(models), time=time.time())
        (partial / CHECKPOINT_DONE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, path: Path, models: dict) -> dict:
    """Restore `models` and this rank's RNG from `path`; returns the trainer state."""
    path = Path(path)
    state = json.loads((path / CHECKPOINT_DONE).read_text())
    for name, model in models.items():
        load_path, _ = model.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the {name} state in {path}")
    if state.get("world_size") == engine.dist.world_size and (path / f"rng_rank{engine.dist.rank:05d}.json").exists():
        load_rng_state(path, engine.dist.rank)
    else:
        set_seed(engine.seed + engine.dist.rank + 7919 * int(state["step"]))
    return state


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / CHECKPOINT_DONE).read_text())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / CHECKPOINT_DONE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_rng_state(folder: Path, rank: int) -> None:
    """This rank's RNG state as JSON (Python, NumPy) and safetensors (torch, CUDA): nothing to unpickle."""
    import numpy as np
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    (folder / f"rng_rank{rank:05d}.json").write_text(json.dumps(plain))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(folder / f"rng_rank{rank:05d}.safetensors"))


def load_rng_state(folder: Path, rank: int) -> None:
    import numpy as np
    from safetensors.torch import load_file

    plain = json.loads((folder / f"rng_rank{rank:05d}.json").read_text())
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(folder / f"rng_rank{rank:05d}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
