"""Checkpoints that are either complete or absent.

A checkpoint is written into a hidden temporary folder beside its final place, a ``manifest.json``
listing every file and its size is written last, and only then is the folder renamed to
``checkpoint-<step>``. ``latest`` only considers folders named exactly ``checkpoint-<digits>`` whose
manifest matches the files on disk, so a crash mid-write, a full disk or a hand-made
``checkpoint-final`` folder can never be picked up by mistake.

With ``--checkpointing_use_tempdir`` the files are first written into a folder under the system
temp dir (fast local disk when ``output_dir`` is a network mount) and then moved into that hidden
folder, so the rename stays the only step that makes a checkpoint visible.

Rolling checkpoints (``--checkpointing_rolling_steps``) share the ``checkpoint-<step>`` name and
are told apart by ``"rolling": true`` in their ``training_state.json``: resume treats both kinds
alike, while each kind is pruned by its own limit, also after a restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-checkpoint-"
#: Prefix of the staging folders ``--checkpointing_use_tempdir`` creates under the system temp dir.
STAGING_PREFIX = "simpletuner-checkpoint-"
TRAINING_STATE = "training_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed; the message names the folder and the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    rolling: bool = False


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _manifest_for(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST
    }


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every listed file is present with its recorded size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_checkpoint(output_dir: Path, step: int, writers: dict[str, Callable[[Path], None]],
                     training_state: dict[str, Any], staging_root: Path | None = None) -> Path:
    """Write a checkpoint atomically.

    ``writers`` maps a file (or folder) name inside the checkpoint to a function that writes it at the
    given path. With ``staging_root`` (``--checkpointing_use_tempdir``) they write into a fresh folder
    there, which is then moved into the hidden folder in ``output_dir``; either way the manifest
    arrives last and the rename into ``checkpoint-<step>`` makes it visible. Returns the final folder.
    On any error the temporary folders are removed and existing checkpoints are left as they were.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    temp = output_dir / f"{TEMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    staging = None
    try:
        temp.mkdir()
        if staging_root is not None:
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{step}-", dir=staging_root))
        _write_contents(staging or temp, step, writers, training_state)
        if staging is not None:
            _move_contents(staging, temp)
        if not is_complete(temp):
            raise OSError(f"the files in {temp} do not match its manifest after moving them from {staging}")
        _fsync_folder(temp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        where = f" (staged under {staging_root} for --checkpointing_use_tempdir)" if staging_root is not None else ""
        raise CheckpointError(
            f"could not write checkpoint {final}{where}: {error.strerror or error}. Existing checkpoints are "
            "untouched; free disk space or change --output_dir, then resume with --resume_from_checkpoint latest"
        ) from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_contents(folder: Path, step: int, writers: dict[str, Callable[[Path], None]],
                    training_state: dict[str, Any]) -> None:
    """Every file of the checkpoint, the manifest last: its presence means the rest was written."""
    for name, write in writers.items():
        write(folder / name)
    (folder / TRAINING_STATE).write_text(json.dumps(training_state, indent=2) + "\n", encoding="utf-8")
    manifest = {"step": step, "files": _manifest_for(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _move_contents(source: Path, target: Path) -> None:
    """Move a staged checkpoint into ``target``, the manifest last, so an interrupted move leaves a
    folder without a manifest (never resumable) and the manifest written in the staging folder can
    check that every file arrived whole."""
    entries = sorted(source.iterdir(), key=lambda entry: entry.name == MANIFEST)
    for entry in entries:
        shutil.move(str(entry), str(target / entry.name))


def _fsync_folder(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def list_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of both kinds, oldest first. Anything else in ``output_dir`` is ignored."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append(CheckpointInfo(entry, int(match.group(1)), _is_rolling(entry)))
    return sorted(found, key=lambda info: info.step)


def _is_rolling(folder: Path) -> bool:
    """The kind is read from the checkpoint itself, so pruning after a restart still tells them apart;
    checkpoints written before rolling ones existed count as regular."""
    try:
        return read_training_state(folder).get("rolling") is True
    except (OSError, ValueError, AttributeError):
        return False


def resolve_resume_path(output_dir: Path, request: str | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` (None if there is none yet) or an explicit folder."""
    if not request:
        return None
    if request == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1].path if checkpoints else None
    path = Path(request)
    if not path.is_absolute() and not path.exists():
        path = output_dir / request
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint: {request!r} is not a folder (looked at {path})")
    if not is_complete(path):
        raise CheckpointError(
            f"--resume_from_checkpoint: {path} is incomplete (its manifest is missing or does not match its files); "
            "pick another checkpoint or use 'latest'"
        )
    return path


def prune_checkpoints(output_dir: Path, keep: int | None, rolling: bool = False) -> list[Path]:
    """Delete the oldest complete checkpoints of one kind beyond ``keep``; returns what was removed.

    Regular checkpoints answer to ``--checkpoints_total_limit`` and rolling ones to
    ``--checkpoints_rolling_total_limit``; neither limit ever deletes a checkpoint of the other kind.
    """
    if not keep:
        return []
    checkpoints = [info for info in list_checkpoints(output_dir) if info.rolling == rolling]
    removed = [info.path for info in checkpoints[: max(0, len(checkpoints) - keep)]]
    limit = "checkpoints_rolling_total_limit" if rolling else "checkpoints_total_limit"
    for path in removed:
        shutil.rmtree(path)
        logger.info("removed old %scheckpoint %s (%s=%d)", "rolling " if rolling else "", path.name, limit, keep)
    return removed


def remove_stale_temp_folders(output_dir: Path) -> None:
    """Half-written checkpoints from a crashed run are garbage: they were never renamed into place."""
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_dir():
                logger.warning("removing incomplete checkpoint folder %s left by an interrupted run", entry.name)
                shutil.rmtree(entry, ignore_errors=True)


def read_training_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINING_STATE).read_text(encoding="utf-8"))
