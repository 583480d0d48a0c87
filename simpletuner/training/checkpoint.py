"""Checkpoints that are either complete or absent.

A checkpoint is written into a hidden temporary folder beside its final place, a ``manifest.json``
listing every file and its size is written last, and only then is the folder renamed to
``checkpoint-<step>``. ``latest`` only considers folders named exactly ``checkpoint-<digits>`` whose
manifest matches the files on disk, so a crash mid-write, a full disk or a hand-made
``checkpoint-final`` folder can never be picked up by mistake.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-checkpoint-"
TRAINING_STATE = "training_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed; the message names the folder and the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


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
                     training_state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically.

    ``writers`` maps a file (or folder) name inside the checkpoint to a function that writes it at the
    given path. Returns the final folder. On any error the temporary folder is removed and existing
    checkpoints are left as they were.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    temp = output_dir / f"{TEMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir()
        for name, write in writers.items():
            write(temp / name)
        (temp / TRAINING_STATE).write_text(json.dumps(training_state, indent=2) + "\n", encoding="utf-8")
        manifest = {"step": step, "files": _manifest_for(temp)}
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync_folder(temp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {error.strerror or error}. Existing checkpoints are untouched; "
            "free disk space or change --output_dir, then resume with --resume_from_checkpoint latest"
        ) from error
    return final


def _fsync_folder(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def list_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first. Anything else in ``output_dir`` is ignored."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append(CheckpointInfo(entry, int(match.group(1))))
    return sorted(found, key=lambda info: info.step)


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


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep``; returns what was removed."""
    if not keep:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [info.path for info in checkpoints[: max(0, len(checkpoints) - keep)]]
    for path in removed:
        shutil.rmtree(path)
        logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", path.name, keep)
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
