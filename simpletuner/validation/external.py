"""``--validation_method external-script``: hand each validation to the user's own program.

The command is split once into an argument list (shell-style quoting, no shell ever runs it), and each
argument has its ``{placeholder}`` fields filled in, so a value with spaces or quotes stays one argument
and cannot inject another command. Torch-free: the config rules parse the same template.
"""

from __future__ import annotations

import json
import logging
import shlex
import string
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from simpletuner.training.checkpoint_hooks import allowed_placeholders, script_values

logger = logging.getLogger(__name__)


def split_command(command: str) -> list[str]:
    """The command's argument list, split like a POSIX shell would (quotes group words); ValueError
    on an empty command or unbalanced quotes."""
    argv = shlex.split(command)
    if not argv:
        raise ValueError("the command is empty")
    return argv


def placeholders_in(argv: list[str]) -> set[str]:
    """Every ``{name}`` field the arguments use (``{{`` and ``}}`` are literal braces)."""
    names = set()
    for argument in argv:
        for _, name, _, _ in string.Formatter().parse(argument):
            if name is not None:
                names.add(name)
    return names


def known_placeholders(config) -> set[str]:
    """What a command may name: the run placeholders and every ``validation_*`` option."""
    return allowed_placeholders(config.as_dict())


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N, or None before the first checkpoint."""
    found = [(int(path.name.split("-", 1)[1]), path) for path in Path(output_dir).glob("checkpoint-*")
             if path.is_dir() and path.name.split("-", 1)[1].isdigit()]
    return max(found)[1] if found else None


@dataclass
class ExternalValidation:
    """The user's validation command, the values it can name, and whether training waits for it."""

    argv: list[str]
    background: bool
    #: placeholder -> text, from the config (run placeholders that depend on the step are added per run)
    values: dict[str, str]
    #: commands started in the background, polled so that finished ones do not linger as zombies
    running: list = field(default_factory=list)

    @classmethod
    def from_config(cls, config) -> "ExternalValidation | None":
        if config.validation_method != "external-script":
            return None
        values = script_values(config)  # remote_checkpoint_path stays empty: nothing is uploaded first
        return cls(argv=split_command(config.validation_external_script),
                   background=bool(config.validation_external_background), values=values)

    def arguments(self, step: int, output_dir: Path) -> list[str]:
        """The argument list for one validation at ``step``: every placeholder replaced by its text."""
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None and "local_checkpoint_path" in placeholders_in(self.argv):
            logger.warning("external validation at step %d: no checkpoint folder in %s yet, "
                           "{local_checkpoint_path} is empty (set --checkpoint_step_interval so one is saved "
                           "before each validation)", step, output_dir)
        values = {**self.values, "global_step": str(step),
                  "local_checkpoint_path": str(checkpoint) if checkpoint else ""}
        return [argument.format_map(values) for argument in self.argv]

    def run(self, step: int, output_dir: Path, folder: Path) -> dict:
        """Run (or start) the command; write what ran into ``folder/external.json`` and return it.
        A failing command is logged with its exit status and output tail but does not stop training:
        the checkpoint it was given is already on disk."""
        self._reap()
        argv = self.arguments(step, output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        record: dict = {"step": step, "argv": argv, "background": self.background}
        if self.background:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            self.running.append(process)
            record["pid"] = process.pid
            logger.info("external validation at step %d started in the background (pid %d): %s", step,
                        process.pid, shlex.join(argv))
        else:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
            record.update(returncode=done.returncode, stdout=done.stdout[-4000:], stderr=done.stderr[-4000:])
            if done.returncode != 0:
                logger.error("external validation at step %d failed with exit status %d: %s\n%s", step,
                             done.returncode, shlex.join(argv), done.stderr[-2000:])
            else:
                logger.info("external validation at step %d finished: %s", step, shlex.join(argv))
        (folder / "external.json").write_text(json.dumps(record, indent=2))
        return record

    def _reap(self) -> None:
        self.running = [process for process in self.running if process.poll() is None]
