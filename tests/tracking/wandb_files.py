"""Reads what an offline wandb run wrote, for the tracker tests.

An offline run keeps everything it logged in ``run-<id>.wandb``: wandb's transaction log, a LevelDB-style
log file (a 7-byte header, then 32 KiB blocks of records, each with a CRC, a length, a type and a
protobuf ``Record``, long records split over blocks). wandb 0.31 no longer ships the Python reader of
that format (its sync runs in the Go core), so this module reads it, and fails loudly if the layout
ever changes instead of finding nothing.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

HEADER = b":W&B"
HEADER_LENGTH = 7  # ident, 2-byte magic, 1-byte version
BLOCK = 32 * 1024
RECORD_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> list[bytes]:
    """The payloads of the log file, with records that span blocks joined again."""
    data = path.read_bytes()
    assert data[:4] == HEADER, f"{path} is not a wandb transaction log (header {data[:4]!r})"
    records, pending, offset = [], b"", HEADER_LENGTH
    while offset + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < RECORD_HEADER:  # block tail padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + RECORD_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block or file
            offset += left_in_block
            continue
        payload = data[offset + RECORD_HEADER:offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
            pending = b""
        else:
            raise AssertionError(f"{path}: unknown record type {kind} at byte {offset}")
    return records


@dataclass
class OfflineRun:
    """What one offline run logged: its name and project, config, and history rows (one per step)."""

    folder: Path
    name: str = ""
    project: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def values(self, key: str) -> list[tuple[int, object]]:
        """``(step, value)`` of every history row that holds ``key``."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def read_offline_run(wandb_dir: Path) -> OfflineRun:
    """The single ``offline-run-*`` under ``wandb_dir`` (``WANDB_DIR``), decoded.

    ``run.finish()`` returns before wandb's service process has written the last records; tearing the
    service down (as a process exit does) waits for them.
    """
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()

    folders = sorted(Path(wandb_dir).glob("**/offline-run-*"))
    assert len(folders) == 1, f"expected one offline run under {wandb_dir}, found {folders}"
    folder = folders[0]
    (log,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    for payload in raw_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name = record.run.display_name or run.name  # later run records may only update other fields
            run.project = record.run.project or run.project
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
    return run


def _items(items) -> dict:
    """Config and history items: a key (or nested key path) and a JSON value."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
