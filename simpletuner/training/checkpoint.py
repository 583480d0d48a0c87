"""Checkpoints that are either complete or absent.

A checkpoint is written into a hidden temporary folder beside its final place, a ``manifest.json``
listing every file and its size is written last, and only then is the folder renamed to
``checkpoint-<step>``. ``latest`` only considers folders named exactly ``checkpoint-<digits>`` whose
manifest matches the files on disk, so a crash mid-write, a full disk or a hand-made
``checkpoint-final`` folder can never be picked up by mistake. Any failure while writing (an
``OSError``, torch's ``RuntimeError`` or safetensors' ``SafetensorError`` on a full disk) removes the
temporary folder and becomes one :class:`CheckpointError` that says how much space was needed.

With ``--checkpointing_use_tempdir`` the files are first written into a folder under the system
temp dir (fast local disk when ``output_dir`` is a network mount) and then moved into that hidden
folder, so the rename stays the only step that makes a checkpoint visible.

Old checkpoints are removed by renaming them to a hidden trash name first and deleting that, so a
kill in the middle of a deletion leaves a trash folder (removed at the next start) instead of a
half-deleted ``checkpoint-<step>`` that nothing would ever clean up.

Rolling checkpoints (``--checkpointing_rolling_steps``) share the ``checkpoint-<step>`` name and
are told apart by ``"rolling": true`` in their ``training_state.json``: resume treats both kinds
alike, while each kind is pruned by its own limit, also after a restart. ``"suspect": true`` marks
a checkpoint saved during a loss spike (see ``training/nan_guard.py``); ``latest`` passes over it.

The ``.pt`` files are read with ``torch.load(weights_only=True)``: a pickle can run any code while it
is loaded, so only tensors, plain Python values and NumPy's RNG arrays are accepted.

Fault injection, for the kill tests and ``benchmarks/kill_sweep.py``: with
``SIMPLETUNER_FAULT_INJECT=<point>:<action>[@<step>]`` the writer kills its own process with SIGKILL
(action ``kill``) or raises ENOSPC (action ``enospc``) when it reaches ``<point>``, for any step or
only for the checkpoint of ``<step>`` (for ``during_prune``: the step of the checkpoint being
removed). Points: ``after_file=<name>`` (after that file of the checkpoint is written, e.g.
``after_file=optimizer.pt``; ``training_state.json`` is one too), ``before_manifest``,
``before_rename`` and ``during_prune`` (an old checkpoint renamed to trash, not yet deleted).
Example: ``SIMPLETUNER_FAULT_INJECT=after_file=optimizer.pt:kill@4``. Unset, it costs one lookup of
the environment per point.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from simpletuner.memory.units import format_size

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-checkpoint-"
#: Prefix of the folders old checkpoints are renamed to before they are deleted.
TRASH_PREFIX = ".trash-checkpoint-"
#: Prefix of the staging folders ``--checkpointing_use_tempdir`` creates under the system temp dir.
STAGING_PREFIX = "simpletuner-checkpoint-"
TRAINING_STATE = "training_state.json"
FAULT_INJECT_ENV = "SIMPLETUNER_FAULT_INJECT"
FAULT_ACTIONS = ("kill", "enospc")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed; the message names the folder and the fix."""


@dataclass(frozen=True)
class PerProcessState:
    """A checkpoint sub-folder holding one file per process (FSDP2's sharded state, DeepSpeed's ZeRO
    state). Each process reads its own file back, so such a checkpoint resumes only with the setting
    and the process count that wrote it, and a checkpoint without the folder only without the setting.
    The strings complete the three refusals in the engine's own words."""

    folder: str
    written: str  # how the checkpoint was written: "written with `--fsdp_state_dict_type sharded`"
    holds: str  # what only the folder holds: "its weights and optimizer state are only in sharded/"
    parts: str  # what each process reads back: "shards"
    resume_with: str  # the setting to resume with: "`--fsdp_enable true --fsdp_state_dict_type sharded`"
    any_count: str  # the way out for another process count: "or use `--fsdp_state_dict_type full` ..."
    without: str  # a checkpoint lacking the folder under the setting: "was written gathered (no sharded/ folder) ..."

    def check_resume(self, checkpoint: Path, state: dict, split_run: bool, num_processes: int) -> None:
        present = (checkpoint / self.folder).is_dir()
        saved = state.get("num_processes")
        if present and not split_run:
            raise CheckpointError(f"{checkpoint} was {self.written} by {saved} process(es): {self.holds}. Resume it "
                                  f"with {self.resume_with} and TRAINING_NUM_PROCESSES={saved}, or start a new "
                                  "--output_dir")
        if present and saved != num_processes:
            raise CheckpointError(f"{checkpoint} holds the {self.parts} of {saved} process(es), and this run has "
                                  f"{num_processes}: each process reads back its own. Set TRAINING_NUM_PROCESSES={saved} "
                                  f"(config/config.env), {self.any_count}")
        if split_run and not present:
            raise CheckpointError(f"{checkpoint} {self.without}, or start a new --output_dir")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    rolling: bool = False
    suspect: bool = False


# --- fault injection ---------------------------------------------------------------------------------


def inject_fault(point: str, step: int) -> None:
    """Kill this process or raise ENOSPC at ``point`` when ``SIMPLETUNER_FAULT_INJECT`` asks for it
    (see the module docstring). Tests use it to prove that no interruption loses a checkpoint."""
    spec = os.environ.get(FAULT_INJECT_ENV)
    if not spec:
        return
    target, _, only_step = spec.partition("@")
    wanted, _, action = target.rpartition(":")
    if action not in FAULT_ACTIONS or not wanted or (only_step and not only_step.isdigit()):
        raise ValueError(f"{FAULT_INJECT_ENV}={spec!r}: write <point>:<action>[@<step>] with action kill or enospc, "
                         "e.g. after_file=optimizer.pt:kill@4")
    if wanted != point or (only_step and int(only_step) != step):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_INJECT_ENV} at {point})")


# --- random generators -------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop draws from."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- reading state files -----------------------------------------------------------------------------


def _numpy_rng_globals() -> list:
    """What NumPy's RNG state (a uint32 array) needs besides tensors: building an array of a dtype.
    Nothing here can call arbitrary code; every optimizer, LR schedule and EMA needs no more."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path: Path) -> Any:
    """A ``.pt`` file of a checkpoint, refusing anything but plain training state.

    A pickle can name any function to call while it loads, so a crafted ``optimizer.pt`` could run
    a command; ``weights_only=True`` only rebuilds tensors, containers, numbers and strings (plus the
    NumPy RNG array), and refuses the file before anything else in it is called.
    """
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a pickle of anything: damaged (or crafted), and nothing in it ran
            raise CheckpointError(f"could not load {path}: it is not a state file written by simpletuner (damaged "
                                  "or replaced); nothing in it was run. Resume from another checkpoint") from None
        raise CheckpointError(
            f"refused to load {path}: it contains a reference to {found.group(1)}, which no checkpoint written by "
            "simpletuner holds (loading it could run code). Do not resume from this folder unless you know where it "
            "came from; pick another checkpoint or start a new --output_dir"
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(f"could not read {path}: {_first_line(error)}; the file is damaged, resume from "
                              "another checkpoint") from error


# --- writing -----------------------------------------------------------------------------------------


def _manifest_for(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST
    }


def _read_manifest_files(folder: Path) -> dict[str, int]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every listed file is present with its recorded size."""
    try:
        files = _read_manifest_files(folder)
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
    On any error the temporary folders are removed, existing checkpoints are left as they were, and
    a CheckpointError says what failed and how much space the checkpoint needs.
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
        inject_fault("before_rename", step)
        _replace_folder(temp, final)
    except Exception as error:
        written = _bytes_in(temp) + _bytes_in(staging)
        failed_on = staging if staging is not None and not _bytes_in(temp) else output_dir  # still staging?
        free = _free_bytes(failed_on)
        shutil.rmtree(temp, ignore_errors=True)
        raise CheckpointError(_write_failure(final, error, staging_root, written, failed_on, free)) from error
    except BaseException:  # Ctrl-C: nothing half-written stays behind (a kill -9 is cleaned at the next start)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_contents(folder: Path, step: int, writers: dict[str, Callable[[Path], None]],
                    training_state: dict[str, Any]) -> None:
    """Every file of the checkpoint, the manifest last: its presence means the rest was written."""
    for name, write in writers.items():
        write(folder / name)
        inject_fault(f"after_file={name}", step)
    (folder / TRAINING_STATE).write_text(json.dumps(training_state, indent=2) + "\n", encoding="utf-8")
    inject_fault(f"after_file={TRAINING_STATE}", step)
    manifest = {"step": step, "files": _manifest_for(folder)}
    inject_fault("before_manifest", step)
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


def _replace_folder(temp: Path, final: Path) -> None:
    """Rename ``temp`` to ``final``; an existing ``final`` (a checkpoint of the same step from before a
    resume) goes to trash first, so no moment exists in which a half-deleted one carries the name."""
    trash = _move_to_trash(final) if final.exists() else None
    os.replace(temp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _bytes_in(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0][:300] if text else type(error).__name__)


def _looks_like_disk_full(error: BaseException) -> bool:
    """ENOSPC as an OSError, or inside the text of torch's RuntimeError / safetensors' SafetensorError."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if re.search(r"No space left|os error (28|122)\b|Disk quota exceeded", str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write_failure(final: Path, error: Exception, staging_root: Path | None, written: int, failed_on: Path,
                   free: int | None) -> str:
    """One message: which folder, why (disk full or another write error), space needed and free."""
    where = f" (staged under {staging_root} for --checkpointing_use_tempdir)" if staging_root is not None else ""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
    previous = list_checkpoints(final.parent)
    if previous:
        needed = f"about {format_size(checkpoint_size(previous[-1].path))} (the size of {previous[-1].path.name})"
    else:
        needed = f"more than the {format_size(written)} written before the failure"
    full = _looks_like_disk_full(error) or (free is not None and free < 1024 * 1024)
    what = "the disk is full" if full else f"the write failed ({type(error).__name__})"
    room = f"; {format_size(free)} was free on the filesystem of {failed_on}" if free is not None else ""
    return (f"could not write checkpoint {final}{where}: {what}: {reason}. The checkpoint needs {needed}{room}. "
            "Its temporary folder was removed and existing checkpoints are untouched; free disk space (or lower "
            "--checkpoints_total_limit, or change --output_dir), then resume with --resume_from_checkpoint latest")


def checkpoint_size(folder: Path) -> int:
    """Bytes of a complete checkpoint, from its manifest."""
    return sum(_read_manifest_files(folder).values())


# --- finding, resuming and pruning -------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of both kinds, oldest first. Anything else in ``output_dir`` is ignored."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            marks = _marks(entry)
            found.append(CheckpointInfo(entry, int(match.group(1)), marks.get("rolling") is True,
                                        marks.get("suspect") is True))
    return sorted(found, key=lambda info: info.step)


def _marks(folder: Path) -> dict[str, Any]:
    """``training_state.json``, read for its ``rolling`` and ``suspect`` marks. The kind is read from the
    checkpoint itself, so pruning after a restart still tells them apart; checkpoints written before
    rolling ones existed count as regular."""
    try:
        state = read_training_state(folder)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


#: ``--resume_from_checkpoint`` values that ask for a fresh start instead of naming a checkpoint.
FRESH_START_WORDS = ("none", "null", "false", "no", "off")


def asks_for_fresh_start(request: str | None) -> bool:
    """True for ``--resume_from_checkpoint none`` (or null, false, no, off): start at step 0."""
    return request is not None and request.strip().lower() in FRESH_START_WORDS


def resolve_resume_path(output_dir: Path, request: str | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` (None if there is none yet) or an explicit folder.

    ``latest`` passes over checkpoints marked suspect (saved during a loss spike); a folder named
    explicitly is used as it is. ``none`` (see :data:`FRESH_START_WORDS`) resumes nothing.
    """
    if not request or asks_for_fresh_start(request):
        return None
    if request == "latest":
        return _latest_trusted(output_dir)
    if request.strip().lower().startswith("s3://"):  # training/remote_checkpoint.py brings it here first
        raise CheckpointError(
            f"--resume_from_checkpoint {request}: an S3 checkpoint is downloaded by `simpletuner train` before the "
            "run starts; from Python, call simpletuner.training.remote_checkpoint.stage_remote_checkpoint and resume "
            "from the folder it returns")
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


def _latest_trusted(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    for info in reversed(checkpoints):
        if not info.suspect:
            return info.path
        logger.warning("--resume_from_checkpoint latest: skipping %s, marked suspect (%s); name it with "
                       "--resume_from_checkpoint %s to resume from it anyway", info.path.name,
                       _marks(info.path).get("suspect_reason", "saved during a loss spike"), info.path.name)
    if checkpoints:
        raise CheckpointError(
            f"--resume_from_checkpoint latest: every checkpoint in {output_dir} is marked suspect (saved during a "
            "loss spike). Name one to resume from it anyway (e.g. --resume_from_checkpoint "
            f"{checkpoints[-1].path.name}), or use a new --output_dir to start over"
        )
    return None


def newest_checkpoint_note(output_dir: Path) -> str:
    """The truth about what a stopped run can resume from, as a sentence for error messages."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return f"No checkpoint was written yet in {output_dir}, so there is nothing to resume from"
    newest = checkpoints[-1]
    note = f"{newest.path.name} (step {newest.step}) is the newest complete checkpoint in {output_dir}"
    if not newest.suspect:
        return note + "; --resume_from_checkpoint latest continues from it"
    trusted = [info for info in checkpoints if not info.suspect]
    fallback = (f"{trusted[-1].path.name} (step {trusted[-1].step}) is the newest one not marked suspect and "
                "--resume_from_checkpoint latest continues from it" if trusted else "no unmarked checkpoint exists")
    return f"{note}, but it is marked suspect (saved during a loss spike); {fallback}"


def prune_checkpoints(output_dir: Path, keep: int | None, rolling: bool = False) -> list[Path]:
    """Delete the oldest complete checkpoints of one kind beyond ``keep``; returns what was removed.

    Regular checkpoints answer to ``--checkpoints_total_limit`` and rolling ones to
    ``--checkpoints_rolling_total_limit``; neither limit ever deletes a checkpoint of the other kind.
    Each folder is renamed to a trash name before it is deleted (see the module docstring). The newest
    checkpoint not marked suspect is never deleted, even when suspect ones after it fill the limit: it
    may be the only one ``latest`` can still resume from.
    """
    if not keep:
        return []
    checkpoints = [info for info in list_checkpoints(output_dir) if info.rolling == rolling]
    trusted = [info for info in checkpoints if not info.suspect]
    last_trusted = trusted[-1] if trusted else None
    beyond_limit = checkpoints[: max(0, len(checkpoints) - keep)]
    removed = [info for info in beyond_limit if info != last_trusted]
    if len(removed) < len(beyond_limit):
        logger.warning("keeping %s beyond --%s: every newer checkpoint is marked suspect", last_trusted.path.name,
                       "checkpoints_rolling_total_limit" if rolling else "checkpoints_total_limit")
    limit = "checkpoints_rolling_total_limit" if rolling else "checkpoints_total_limit"
    for info in removed:
        trash = _move_to_trash(info.path)
        inject_fault("during_prune", info.step)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("removed old %scheckpoint %s (%s=%d)", "rolling " if rolling else "", info.path.name, limit, keep)
    return [info.path for info in removed]


def _move_to_trash(folder: Path) -> Path:
    """Rename ``folder`` to a hidden name that no checkpoint pattern matches; returns the new path."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    return trash


def remove_stale_temp_folders(output_dir: Path) -> None:
    """Half-written checkpoints and half-deleted old ones from a killed run are garbage: the first were
    never renamed into place, the second were renamed out of it."""
    if not output_dir.is_dir():
        return
    for entry in sorted(output_dir.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(TEMP_PREFIX):
            logger.warning("removing incomplete checkpoint folder %s left by an interrupted run", entry.name)
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(TRASH_PREFIX):
            logger.warning("removing %s: an old checkpoint whose deletion was interrupted", entry.name)
            shutil.rmtree(entry, ignore_errors=True)
        elif CHECKPOINT_PATTERN.match(entry.name) and (entry / MANIFEST).is_file() and not is_complete(entry):
            logger.warning("%s has a manifest but files are missing or changed (%s on disk): it is damaged, perhaps "
                           "half-deleted by an older version; it is never resumed from, delete it to free the space",
                           entry.name, format_size(_bytes_in(entry)))


def read_training_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINING_STATE).read_text(encoding="utf-8"))
