"""``--post_upload_script``: the user's command, started after each final upload of a run.

The command is split into arguments like a shell would (``shlex``), then each argument's placeholders
are filled in on its own, and the list is executed directly, never through a shell. A path with spaces
or quotes in a placeholder therefore stays one argument and cannot change what runs; pipes,
redirections or ``$VARS`` are refused at start-up (put them in a script file instead).

Placeholders (see documentation/PUBLISHING.md): ``{remote_checkpoint_path}`` (where the upload went:
``https://huggingface.co/<repo>`` for the Hub, ``s3://bucket/prefix/<product>`` for S3; empty when
nothing was uploaded), ``{local_checkpoint_path}`` (the product in the output dir), ``{global_step}``,
``{tracker_run_name}``, ``{tracker_project_name}``, ``{model_family}``, ``{model_type}``,
``{lora_type}``, ``{huggingface_path}`` and any ``validation_*`` option.

The script runs once per upload target (the Hub, then each ``--publishing_config`` entry), or once with an
empty ``{remote_checkpoint_path}`` when the run uploads nothing, so local automation works the same.
It is started in the background; its exit status is logged and a failure never fails the run.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from simpletuner.training.checkpoint_hooks import BackgroundScripts, needs_shell, script_values

logger = logging.getLogger(__name__)


@dataclass
class PostUploadScript:
    """Starts ``--post_upload_script`` for each upload and keeps the started processes."""

    template: str
    config_values: dict[str, str]
    scripts: BackgroundScripts = field(
        default_factory=lambda: BackgroundScripts("--post_upload_script", "the run's outputs are unaffected"))

    @classmethod
    def from_config(cls, config) -> PostUploadScript | None:
        if not config.post_upload_script:
            return None
        return cls(template=config.post_upload_script, config_values=script_values(config))

    def command_for(self, local_path: Path | str, step: int, remote_path: str) -> list[str]:
        """The argument list for one upload; ``global_step`` stays a number so ``{global_step:06d}`` works."""
        if needs_shell(self.template):
            raise ValueError("shell syntax is not run; put the pipeline in a script file")
        values = {**self.config_values, "local_checkpoint_path": str(Path(local_path).resolve()),
                  "global_step": step, "remote_checkpoint_path": remote_path}
        return [argument.format_map(values) for argument in shlex.split(self.template)]

    def launch(self, local_path: Path | str, step: int, remote_path: str) -> None:
        """Start the script and return at once; a script that cannot start only warns."""
        target = remote_path or "no upload"
        try:
            command = self.command_for(local_path, step, remote_path)
        except (ValueError, KeyError, IndexError) as error:
            logger.warning("--post_upload_script could not start after %s: %s (the run's outputs are unaffected)",
                           target, error)
            return
        self.scripts.start(command, target)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the started scripts (tests; the trainer lets them run on after it returns)."""
        self.scripts.wait(timeout)
