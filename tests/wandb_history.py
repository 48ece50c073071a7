"""Read the history back from an offline wandb run's own file (run-<id>.wandb).

wandb 0.31 ships no Python reader, so this reads the LevelDB-log framing it writes: a 7-byte header
(":W&B", magic 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte header (CRC32,
length, type: full / first / middle / last), whose payloads are wandb's own protobuf `Record`s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a wandb run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def history(run_file: Path) -> dict[int, dict]:
    """{step: {metric: value}} from the run's history records (wandb's own _-prefixed keys dropped)."""
    from wandb.proto import wandb_internal_pb2

    rows: dict[int, dict] = {}
    for raw in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = int(items.get("_step", record.history.step.num))
        rows.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows
