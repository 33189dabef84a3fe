"""Read back an offline W&B run file (`wandb/offline-run-*/run-<id>.wandb`).

wandb 0.31 has no public reader. The file is a 7-byte header (b":W&B", magic, version) followed by
LevelDB-log records in 32 KiB blocks: crc32 (4 bytes), length (2, little-endian), type (1: FULL=1,
FIRST=2, MIDDLE=3, LAST=4), payload; payloads are `wandb_internal_pb2.Record` protos. A test helper (tests/test_wandb_offline.py,
tests/test_montage_train.py), also usable to check an offline run without syncing it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        if kind == FULL:
            out.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            out.append(pending + body)
            pending = b""
    return out


def read_offline_run(path: Path | str) -> dict[str, Any]:
    """-> {"history": [ {key: value} per logged step ], "config": {key: value}, "summary": {...}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    run: dict[str, Any] = {"history": [], "config": {}, "summary": {}}
    for payload in _payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                run["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][_key(item)] = json.loads(item.value_json)
    return run


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def find_run_file(save_dir: Path | str) -> Path:
    files = sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {save_dir}/wandb")
    return files[-1]
