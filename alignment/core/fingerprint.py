"""Fingerprints: hashes that say whether two runs saw the same model, data and order.

Used to key caches (the precomputed DPO reference), to refuse a resume whose data order
changed, and for stage lineage (manifest.json, pipeline skipping). A hub model is pinned to
the commit its revision points to in the local Hugging Face cache, never to a moving branch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".txt", ".py", ".jinja")


def _hash_files(files: list[Path], digest) -> None:
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model at `revision` (a branch, tag or commit), or None when the
    cache does not hold it. A branch resolves through refs/<branch> to the commit it points to now."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not in the cache, or not a valid repo id: it cannot be pinned
        return None


def model_fingerprint(path: str, revision: str | None = None) -> str | None:
    """sha256 of a model's weights, config and tokenizer files: a local directory, or a hub id's snapshot
    at `revision`. None for a hub id the local cache does not hold (nothing can be pinned)."""
    folder = Path(path)
    if not folder.is_dir():
        folder = hub_snapshot(path, revision)
        if folder is None:
            return None
    digest = hashlib.sha256()
    _hash_files(sorted(f for f in folder.iterdir() if f.suffix in _MODEL_FILES and f.is_file()), digest)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    _hash_files([Path(path)], digest)
    return digest.hexdigest()


def sequence_fingerprint(items) -> str:
    """sha256 of token-id sequences in order (anything with a stable repr)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()
