"""What the trainer does when training goes numerically wrong: a loss that is NaN or infinite, trained
weights that are no longer finite, and a loss that shoots far above its usual level.

- A non-finite loss is caught at the step it happens, before its update reaches the weights.
  ``--nan_action stop`` (the default) ends the run with one message naming the step, the loss, the
  learning rate and the checkpoint that is actually usable; ``--nan_action skip_batch`` drops that
  batch's update (no optimizer step, the LR schedule and EMA stay where they were, the step does not
  count), logs a warning, and gives up after :data:`MAX_CONSECUTIVE_SKIPS` bad batches in a row.
- A checkpoint is never written from weights holding NaN or inf (:func:`first_nonfinite`).
- :func:`loss_spike` tells the trainer when the recent loss is far above its running median, so the
  checkpoint saved then is marked ``"suspect": true`` and ``--resume_from_checkpoint latest`` passes
  over it: exploding weights are usually still finite one step before the loss turns NaN.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from statistics import median
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

NAN_ACTIONS = ("stop", "skip_batch")
#: ``--nan_action skip_batch`` stops the run after this many non-finite batches in a row: by then the
#: weights or the data are broken, and skipping more would only hide it.
MAX_CONSECUTIVE_SKIPS = 10
#: A checkpoint is suspect when the median loss of the last :data:`SPIKE_RECENT_STEPS` steps exceeds
#: this many times the median of the :data:`SPIKE_HISTORY_STEPS` steps before them. A diffusion loss
#: varies a few-fold between timesteps, so a single high step never trips it; weights that are blowing
#: up raise every step's loss by orders of magnitude.
SPIKE_FACTOR = 10.0
SPIKE_RECENT_STEPS = 5
SPIKE_HISTORY_STEPS = 200
#: Fewer steps than this before the recent window: too little history to call anything a spike.
SPIKE_MIN_HISTORY = 20


@dataclass
class NanGuard:
    """``--nan_action`` for one run: decides whether an update may be applied and what a bad loss does."""

    action: str = "stop"
    max_consecutive: int = MAX_CONSECUTIVE_SKIPS
    consecutive: int = 0
    skipped: int = 0
    last_terms: list[float] = field(default_factory=list)
    #: DeepSpeed ZeRO steps inside the backward pass, so a bad batch's update is applied before it is seen.
    engine_steps_in_backward: bool = False

    @classmethod
    def from_config(cls, config) -> NanGuard:
        from simpletuner.training.deepspeed import uses_deepspeed

        return cls(action=config.nan_action, engine_steps_in_backward=uses_deepspeed(config))

    def update_allowed(self, accelerator, micro_losses: list[float]) -> bool:
        """True when every micro-batch loss of this optimizer step is finite (on every process, under
        ``skip_batch``, so all processes drop or apply the same update and their weights stay equal)."""
        self.last_terms = list(micro_losses)
        finite = all(math.isfinite(loss) for loss in micro_losses)
        if self.action == "skip_batch" and accelerator.num_processes > 1:
            from simpletuner.training.distributed import mean_over_processes

            finite = mean_over_processes(accelerator, 0.0 if finite else 1.0) == 0.0
        return finite

    def finite_step(self) -> None:
        self.consecutive = 0

    def nonfinite_step(self, step: int, loss: float, lr: float, checkpoint_note: str) -> None:
        """A step whose loss is not finite: raise FloatingPointError to stop, or log the skipped batch."""
        what = f"loss became {loss} at step {step} ({self._terms()}learning rate {lr:.3g})"
        if self.action == "stop":
            applied = ("DeepSpeed's engine had already applied the update of that batch, so resume from a checkpoint"
                       if self.engine_steps_in_backward else "the update of that batch was not applied")
            raise FloatingPointError(
                f"{what}; training stopped (--nan_action stop) and {applied}. "
                f"{checkpoint_note}. Lower --learning_rate or set --max_grad_norm, or use --nan_action skip_batch "
                "to drop such batches"
            )
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{what}; that is {self.consecutive} batches in a row with a non-finite loss, so training stopped "
                f"(--nan_action skip_batch gives up after {self.max_consecutive}; {self.skipped} skipped in this "
                f"run). {checkpoint_note}. Lower --learning_rate or set --max_grad_norm"
            )
        logger.warning("%s: skipped the batch, no update applied (--nan_action skip_batch; %d in a row, %d in this "
                       "run, the run stops at %d in a row)", what, self.consecutive, self.skipped, self.max_consecutive)

    def _terms(self) -> str:
        if len(self.last_terms) < 2:
            return ""
        return "micro-batch losses " + ", ".join(f"{term:.4g}" for term in self.last_terms) + "; "


def loss_spike(losses: Sequence[float]) -> str | None:
    """Why the latest losses count as a spike (see :data:`SPIKE_FACTOR`), or None."""
    recent = losses[-SPIKE_RECENT_STEPS:]
    history = losses[-(SPIKE_RECENT_STEPS + SPIKE_HISTORY_STEPS):-SPIKE_RECENT_STEPS]
    if len(recent) < SPIKE_RECENT_STEPS or len(history) < SPIKE_MIN_HISTORY:
        return None
    now, usual = median(recent), median(history)
    if usual > 0 and now > SPIKE_FACTOR * usual:
        return (f"median loss of the last {len(recent)} steps {now:.4g} is {now / usual:.0f}x the median "
                f"{usual:.4g} of the {len(history)} steps before")
    return None


def first_nonfinite(parameters: Iterable) -> tuple[int, int] | None:
    """(index of the first trained tensor holding NaN or inf, how many do), or None when all are finite."""
    import torch

    bad = [index for index, parameter in enumerate(parameters) if not torch.isfinite(parameter.detach()).all()]
    return (bad[0], len(bad)) if bad else None
