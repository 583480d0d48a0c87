"""What runs around a checkpoint save: the free-space check before it and the user's script after it.

Both act on the main process only, where checkpoints are written. The module is torch-free so the
config rules can share its placeholder vocabulary without loading torch.

- :class:`DiskGuard` (``--disk_low_threshold``/``--disk_low_action``/``--disk_low_script``) runs
  before anything of a checkpoint is written, so stopping never leaves a partial folder.
- :class:`PostCheckpointScripts` (``--post_checkpoint_script``) starts the user's command once a
  checkpoint folder is complete, without waiting for it: training goes on, the exit status is logged
  when it ends, and the end of the run waits for every script still running.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import string
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from simpletuner.memory.units import format_size, parse_size

logger = logging.getLogger(__name__)

#: How long ``--disk_low_action wait`` sleeps between two looks at the free space.
DISK_RECHECK_SECONDS = 30.0

#: Placeholders every user command (``--post_checkpoint_script``, ``--post_upload_script``,
#: ``--validation_external_script``) may use, besides any ``validation_*`` option name.
SCRIPT_PLACEHOLDERS = ("local_checkpoint_path", "global_step", "output_dir", "tracker_run_name",
                       "tracker_project_name", "model_family", "model_type", "lora_type", "huggingface_path",
                       "remote_checkpoint_path")
#: Characters that make a command a shell pipeline, redirection, list or expansion.
SHELL_OPERATORS = frozenset("();<>|&")


# --- free space before a save ------------------------------------------------------------------------


def _checkpoint_error(message: str) -> Exception:
    """A CheckpointError (what ``simpletuner train`` reports as one line), imported late to stay torch-free."""
    from simpletuner.training.checkpoint import CheckpointError

    return CheckpointError(message)


@dataclass
class DiskGuard:
    """Makes sure ``threshold`` bytes are free on ``folder``'s filesystem before a checkpoint is written.

    ``sleep`` and ``recheck_seconds`` are fields so tests can wait without sleeping.
    """

    folder: Path
    threshold: int
    threshold_text: str
    action: str = "stop"
    script: str | None = None
    recheck_seconds: float = DISK_RECHECK_SECONDS
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_config(cls, config, folder: Path) -> DiskGuard | None:
        """None when ``--disk_low_threshold`` is unset (the check is off)."""
        if not config.disk_low_threshold:
            return None
        return cls(folder=Path(folder), threshold=parse_size(config.disk_low_threshold),
                   threshold_text=str(config.disk_low_threshold), action=config.disk_low_action or "stop",
                   script=config.disk_low_script)

    def free_bytes(self) -> int:
        """Free bytes where the checkpoint will go (the nearest existing folder, before the first save)."""
        folder = next((p for p in (self.folder, *self.folder.parents) if p.exists()), self.folder)
        return shutil.disk_usage(folder).free

    def ensure_space(self, step: int) -> None:
        """Return once there is room for the checkpoint of ``step``; raise CheckpointError to stop the run."""
        free = self.free_bytes()
        if free >= self.threshold:
            return
        if self.action == "wait":
            self._wait_for_space(free, step)
        elif self.action == "script":
            self._run_cleanup_script(free, step)
        else:
            raise _checkpoint_error(self._shortage(free, step) + "; stopped here. " + self._advice())

    def _shortage(self, free: int, step: int) -> str:
        return (f"only {format_size(free)} free on the filesystem of {self.folder}, under --disk_low_threshold "
                f"{self.threshold_text} ({format_size(self.threshold)}), before the checkpoint for step {step}")

    @staticmethod
    def _advice() -> str:
        return ("Nothing of this checkpoint was written and existing checkpoints are untouched. Free some space "
                "(delete old checkpoints or lower --checkpoints_total_limit) or use an --output_dir on a larger "
                "disk, then continue with --resume_from_checkpoint latest; --disk_low_action wait or script "
                "keeps the run going instead")

    def _wait_for_space(self, free: int, step: int) -> None:
        """Poll until space appears; the run pauses (it never skips the checkpoint)."""
        logger.warning("%s; waiting for space, checking every %gs (--disk_low_action wait)",
                       self._shortage(free, step), self.recheck_seconds)
        waited = 0.0
        while free < self.threshold:
            self.sleep(self.recheck_seconds)
            waited += self.recheck_seconds
            free = self.free_bytes()
            if free < self.threshold:
                logger.info("still %s free on %s, need %s; waited %.0fs so far", format_size(free), self.folder,
                            format_size(self.threshold), waited)
        logger.info("%s free on %s after waiting %.0fs; saving the checkpoint for step %d", format_size(free),
                    self.folder, waited, step)

    def _run_cleanup_script(self, free: int, step: int) -> None:
        """Run ``--disk_low_script`` once and look again; a failure or too little space stops the run."""
        logger.warning("%s; running --disk_low_script %s", self._shortage(free, step), self.script)
        try:
            result = subprocess.run([str(self.script)], stdin=subprocess.DEVNULL, check=False)
        except OSError as error:
            raise _checkpoint_error(f"{self._shortage(free, step)}, and --disk_low_script {self.script} could not "
                                    f"run: {error}. {self._advice()}") from error
        if result.returncode != 0:
            raise _checkpoint_error(f"{self._shortage(free, step)}, and --disk_low_script {self.script} failed with "
                                    f"exit status {result.returncode}. {self._advice()}")
        free = self.free_bytes()
        if free < self.threshold:
            raise _checkpoint_error(f"--disk_low_script {self.script} ran, but {self._shortage(free, step)}. "
                                    f"{self._advice()}")
        logger.info("--disk_low_script freed space: %s free on %s; saving the checkpoint for step %d",
                    format_size(free), self.folder, step)


# --- the user's script after a save -------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    """The placeholder names in a ``str.format`` template (ValueError on a lone ``{`` or ``}``)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def allowed_placeholders(option_names) -> set[str]:
    """The fixed placeholders plus every ``validation_*`` option."""
    return set(SCRIPT_PLACEHOLDERS) | {name for name in option_names if name.startswith("validation_")}


def needs_shell(template: str) -> bool:
    """A command needs a shell when it pipes, redirects, chains or expands variables; anything else runs
    directly, so paths with spaces or quotes in the placeholders cannot change what is executed."""
    if "$" in template or "`" in template:
        return True
    lexer = shlex.shlex(template, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return any(token and set(token) <= SHELL_OPERATORS for token in lexer)


def script_text(value) -> str:
    """How a config value reads inside a command's argument: empty when unset, ``true``/``false`` for
    switches, JSON for lists and mappings."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def script_values(config) -> dict[str, str]:
    """The placeholders a user's command takes from the run's configuration, shared by
    ``--post_checkpoint_script``, ``--post_upload_script`` and ``--validation_external_script``: every
    ``validation_*`` option, the tracker names, family, model and LoRA type, the Hub id and the output
    folder. ``remote_checkpoint_path`` is empty here; an upload fills it in."""
    options = config.as_dict()
    values = {name: script_text(value) for name, value in options.items() if name.startswith("validation_")}
    values.update(
        tracker_run_name=script_text(config.tracker_run_name), tracker_project_name=script_text(config.tracker_project_name),
        model_family=script_text(config.model_family), model_type=script_text(config.model_type),
        lora_type=script_text(config.lora_type) if config.model_type == "lora" else "",
        huggingface_path=script_text(options.get("hub_model_id")), output_dir=script_text(config.output_dir),
        remote_checkpoint_path="",
    )
    return values


@dataclass
class BackgroundScripts:
    """Commands started without waiting for them; each one's exit status is logged when it ends.
    ``option`` names the flag in the log lines, ``after_failure`` says what a failure does not stop."""

    option: str
    after_failure: str = "training goes on"
    running: list[tuple[subprocess.Popen, threading.Thread]] = field(default_factory=list)

    def start(self, command: list[str] | str, label: str) -> None:
        """Start ``command`` (an argument list, or a command line for the shell) for ``label``; a
        command that cannot start only warns."""
        self._forget_finished()
        try:
            process = subprocess.Popen(command, shell=isinstance(command, str), stdin=subprocess.DEVNULL)
        except (OSError, ValueError, TypeError) as error:
            logger.warning("%s could not start for %s: %s (%s)", self.option, label, error, self.after_failure)
            return
        logger.info("started %s for %s (pid %d)", self.option, label, process.pid)
        watcher = threading.Thread(target=self._report, args=(process, label), daemon=True, name=f"script-{label}")
        watcher.start()
        self.running.append((process, watcher))

    def _report(self, process: subprocess.Popen, label: str) -> None:
        code = process.wait()
        if code == 0:
            logger.info("%s for %s finished (exit status 0)", self.option, label)
        else:
            logger.warning("%s for %s failed with exit status %d (%s)", self.option, label, code, self.after_failure)

    def _forget_finished(self) -> None:
        self.running = [(process, watcher) for process, watcher in self.running if watcher.is_alive()]

    def wait(self, timeout: float | None = None) -> None:
        """Block until every started command has ended (at most ``timeout`` seconds each), so none
        outlives the run unnoticed."""
        self._forget_finished()
        if self.running:
            logger.info("waiting for %d %s run(s) to finish (pids %s)", len(self.running), self.option,
                        ", ".join(str(process.pid) for process, _ in self.running))
        for _, watcher in self.running:
            watcher.join(timeout)
        self._forget_finished()


@dataclass
class PostCheckpointScripts:
    """Starts ``--post_checkpoint_script`` after each checkpoint and keeps track of the running ones."""

    template: str
    config_values: dict[str, str]
    scripts: BackgroundScripts = field(default_factory=lambda: BackgroundScripts("--post_checkpoint_script"))

    @classmethod
    def from_config(cls, config) -> PostCheckpointScripts | None:
        """None when no script is configured. Config values are captured once; only the checkpoint's
        path and step change between runs of the script."""
        if not config.post_checkpoint_script:
            return None
        return cls(template=config.post_checkpoint_script, config_values=script_values(config))

    @property
    def running(self) -> list[tuple[subprocess.Popen, threading.Thread]]:
        return self.scripts.running

    def command_for(self, folder: Path, step: int) -> list[str] | str:
        """The argument list (or, for shell syntax, a command line with quoted values) for one checkpoint.

        ``global_step`` stays an int so ``{global_step:06d}`` works; every other value is text.
        """
        values = {**self.config_values, "local_checkpoint_path": str(Path(folder).resolve()), "global_step": step}
        if needs_shell(self.template):
            quoted = {name: value if isinstance(value, int) else shlex.quote(value) for name, value in values.items()}
            return self.template.format_map(quoted)
        return [argument.format_map(values) for argument in shlex.split(self.template)]

    def launch(self, folder: Path, step: int) -> None:
        """Start the script for a complete checkpoint and return at once; failures only warn."""
        try:
            command = self.command_for(folder, step)
        except (ValueError, KeyError, IndexError) as error:
            logger.warning("--post_checkpoint_script could not start for %s: %s (training goes on)", folder.name, error)
            return
        self.scripts.start(command, folder.name)

    def wait(self) -> None:
        """Block until every started script has ended, so none outlives the run unnoticed."""
        self.scripts.wait()


def executable_on_path(command: str) -> bool:
    """Whether the program a command starts exists here (a path, or a name found on PATH)."""
    program = shlex.split(command)[0] if command.strip() else ""
    return bool(program) and (shutil.which(program) is not None or os.access(program, os.X_OK))
