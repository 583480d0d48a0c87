"""Validate the three files as one setup, then replace them atomically.

All three files are first written to temporary files beside their targets and validated together:
the dataset list by the dataset schema, config.json by the very functions ``simpletuner train``
uses (:func:`~simpletuner.options.files.read_config_file`, :func:`~simpletuner.options.resolve.merge_sources`,
:func:`~simpletuner.options.validation.validate_config`), pointed at the staged dataset list. Only when
everything passes are the targets replaced with :func:`os.replace`, dataset list first and config.json
last, so config.json never names a dataset list that is not there yet. An error or Ctrl-C before that
point removes the temporary files and leaves every existing file byte-identical.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from simpletuner.configure.draft import Draft, display_path
from simpletuner.options import ConfigError, alias_targets, options_by_name
from simpletuner.options.messages import show_value


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def ordered_config(draft: Draft) -> dict[str, Any]:
    """config.json's keys: the file's own keys in file order, then new ones in options-table order, so
    that the same answers give the same file whatever order they were given in."""
    rank = {name: index for index, name in enumerate(options_by_name())}
    aliases = alias_targets()
    added = [key for key in draft.config if key not in draft.original_config]
    added.sort(key=lambda key: rank.get(aliases.get(key.lstrip("-"), key.lstrip("-")), len(rank)))
    return {key: draft.config[key] for key in [k for k in draft.config if k in draft.original_config] + added}


def render(draft: Draft) -> dict[Path, bytes]:
    """The bytes of each file, in replacement order; an unchanged file keeps its exact original bytes."""
    def keep_or(path: Path, unchanged: bool, fresh: bytes) -> bytes:
        return draft.originals[path] if unchanged and path in draft.originals else fresh

    return {
        draft.dataset_path: keep_or(draft.dataset_path, draft.datasets == draft.original_datasets,
                                    _json_bytes(draft.datasets)),
        draft.env_path: keep_or(draft.env_path, draft.env_lines == draft.original_env_lines,
                                "".join(line + "\n" for line in draft.env_lines).encode("utf-8")),
        draft.config_path: keep_or(draft.config_path, draft.config == draft.original_config,
                                   _json_bytes(ordered_config(draft))),
    }


def validate_staged(draft: Draft, staged: dict[Path, Path]) -> list[str]:
    """Check the staged files with ``simpletuner train``'s own resolution; return its warnings.

    ``staged`` maps each target to its temporary file. :func:`~simpletuner.options.resolve.resolve_run`
    (what ``train --dry-run`` runs) reads the staged config.json, with ``--data_backend_config``
    pointing at the staged list (which its validation parses, once) and a scratch root whose
    ``config/config.env`` is the staged config.env. Launcher variables of the calling shell are left
    out, so the files are judged on their own. Messages name the targets, not the temporary files.
    """
    from simpletuner.options.files import LAUNCHER_VARIABLES
    from simpletuner.options.resolve import resolve_run

    renames = {str(temporary): str(target) for target, temporary in staged.items()}
    try:
        with tempfile.TemporaryDirectory(prefix="simpletuner-configure-") as scratch:
            env_file = Path(scratch) / "config" / "config.env"
            env_file.parent.mkdir()
            env_file.write_bytes(staged[draft.env_path].read_bytes())
            renames[str(env_file)] = str(draft.env_path)
            environ = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and k != "ENV"}
            run = resolve_run(["--config", str(staged[draft.config_path]),
                               "--data_backend_config", str(staged[draft.dataset_path])],
                              environ=environ, root=Path(scratch))
    except ConfigError as error:
        message = str(error)
        for temporary, target in renames.items():
            message = message.replace(temporary, target)
        raise type(error)(message) from None
    return [warning.replace(str(staged[draft.config_path]), str(draft.config_path)) for warning in run.warnings]


class Staging:
    """Temporary files holding the new content, validated; :meth:`commit` puts them in place."""

    def __init__(self, draft: Draft, contents: dict[Path, bytes], temporaries: dict[Path, Path]):
        self.draft = draft
        self.contents = contents
        self.temporaries = temporaries
        self.warnings: list[str] = []
        self.committed = False

    def changed(self) -> list[Path]:
        """The targets whose bytes will change (new files included)."""
        return [path for path, data in self.contents.items() if self.draft.originals.get(path) != data]

    def commit(self) -> list[Path]:
        """Replace the changed targets (Ctrl-C is held off for these few renames); return them."""
        changed = self.changed()
        with _sigint_ignored():
            for path in changed:
                os.replace(self.temporaries.pop(path), path)
        self.committed = True
        return changed


@contextmanager
def staged(draft: Draft, cwd: Path) -> Iterator[Staging]:
    """Point config.json at the dataset list, render, stage and validate the files; on leaving,
    remove whatever was not committed (and folders this created, when nothing was)."""
    draft.point_at_dataset_file(cwd)
    contents = render(draft)
    temporaries: dict[Path, Path] = {}
    created: list[Path] = []
    staging = Staging(draft, contents, temporaries)
    try:
        for path in contents:
            _check_replaceable(path)
        for path, data in contents.items():
            try:
                created.extend(_make_folders(path.parent))
                temporaries[path] = _write_temporary(path, data)
            except OSError as error:  # a parent that is a file, no permission, a name too long, a full disk
                raise ConfigError(f"cannot write {show_value(str(path))}: {error.strerror or error}; nothing was "
                                  "changed") from None
        staging.warnings = validate_staged(draft, temporaries)
        yield staging
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        if not staging.committed:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass


def _check_replaceable(path: Path) -> None:
    """Only a regular file (or nothing) may be replaced: renaming over ``/dev/null``, a folder or a pipe
    that a config happens to name would destroy it (as root, ``/dev/null`` itself)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"cannot write {show_value(str(path))}: {error.strerror or error}; nothing was "
                          "changed") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{show_value(str(path))} exists and is not a regular file; the setup files must be "
                          "plain files, so give another path (nothing was changed)")


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.append(path)
    except OSError:  # leave no half-made chain of folders behind
        for path in reversed(made):
            path.rmdir()
        raise
    return made


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a hidden temporary file beside ``path``, flushed to disk, with ``path``'s mode
    (or the umask's default for a new file)."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(name, mode)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- what to tell the user -------------------------------------------------------------------------


def describe_changes(draft: Draft) -> list[str]:
    """One line per changed config key, plus one per other file: what writing will do. Values are
    shown redacted (tokens, keys, webhook URLs: simpletuner/options/secrets.py); the files get them whole."""
    from simpletuner.options.secrets import redact_value

    def shown(key: str, value) -> str:
        return json.dumps(redact_value(key, value))

    lines = []
    if draft.config_path not in draft.originals:
        lines.append(f"{draft.config_path} (new): " + ", ".join(draft.config))
    else:
        old, new = draft.original_config, draft.config
        for key in new:
            if key not in old:
                lines.append(f"{draft.config_path}: add {key} = {shown(key, new[key])}")
            elif old[key] != new[key]:
                lines.append(f"{draft.config_path}: {key} {shown(key, old[key])} -> {shown(key, new[key])}")
        lines.extend(f"{draft.config_path}: remove {key}" for key in old if key not in new)
    for path, new_value, old_value in ((draft.dataset_path, draft.datasets, draft.original_datasets),
                                       (draft.env_path, draft.env_lines, draft.original_env_lines)):
        if path not in draft.originals:
            lines.append(f"{path} (new)")
        elif new_value != old_value:
            lines.append(f"{path}: changed")
    return lines or ["no changes"]


def start_command(draft: Draft, cwd: Path) -> str:
    """The command that trains with the written files, run from ``cwd``.

    ``simpletuner train`` reads ``config/config.env`` (and ``config/<ENV>/config.env``) under the
    working directory: a config at ``config/<NAME>/config.json`` is started with ``--env NAME``;
    one outside ``config/`` gets the number of processes on the command line.
    """
    config = display_path(draft.config_path, cwd)
    parts = PurePosixPath(config).parts
    if len(parts) == 3 and parts[0] == "config" and parts[2] == "config.json":
        return f"simpletuner train --env {shlex.quote(parts[1])}"
    command = f"simpletuner train --config {shlex.quote(config)}"
    processes = draft.env_get("TRAINING_NUM_PROCESSES")
    if parts != ("config", "config.json") and processes not in (None, "1"):
        command = f"TRAINING_NUM_PROCESSES={processes} {command}"
    return command
