"""Which optimizer steps get a checkpoint, and of which kind.

Regular checkpoints come from ``--checkpoint_step_interval`` and ``--checkpoint_epoch_interval`` and
are pruned by ``--checkpoints_total_limit``; rolling ones come from ``--checkpointing_rolling_steps``
and are pruned by ``--checkpoints_rolling_total_limit``. A step is saved at most once: when it is due
for both kinds it becomes a regular checkpoint, because regular ones are the ones meant to last.

An epoch is ``steps_per_epoch`` optimizer steps, the same count ``--num_train_epochs`` uses, so epoch
checkpoints land where the run's own epoch count says an epoch ended, also after a resume. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

REGULAR = "regular"
ROLLING = "rolling"


@dataclass(frozen=True)
class CheckpointSchedule:
    """The checkpoint intervals of one run, all in optimizer steps except ``epoch_interval``."""

    step_interval: int | None = None
    epoch_interval: int | None = None
    steps_per_epoch: int = 1
    rolling_interval: int | None = None

    @classmethod
    def from_config(cls, config, steps_per_epoch: int) -> CheckpointSchedule:
        return cls(step_interval=config.checkpoint_step_interval, epoch_interval=config.checkpoint_epoch_interval,
                   steps_per_epoch=max(1, steps_per_epoch), rolling_interval=config.checkpointing_rolling_steps)

    def kind_at(self, step: int) -> str | None:
        """``REGULAR``, ``ROLLING`` or None (no checkpoint) for the step just completed."""
        if _every(step, self.step_interval) or self.ends_epoch_checkpoint(step):
            return REGULAR
        if _every(step, self.rolling_interval):
            return ROLLING
        return None

    def ends_epoch_checkpoint(self, step: int) -> bool:
        """True when ``step`` completes an epoch whose number is a multiple of ``epoch_interval``."""
        if not self.epoch_interval:
            return False
        return _every(step, self.epoch_interval * self.steps_per_epoch)


def _every(step: int, interval: int | None) -> bool:
    return bool(interval) and step > 0 and step % interval == 0
