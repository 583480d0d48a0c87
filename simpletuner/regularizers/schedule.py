"""When a representation-alignment regularizer (CREPA now, U-REPA later) counts, and how much.

Two independent pieces, both shared so every alignment regularizer reads its options the same way:

* :class:`WeightSchedule` turns the optimizer step into the term's weight: a linear warmup from 0,
  then constant, linear, cosine or polynomial decay from the base weight to ``lambda_end`` over
  ``decay_steps`` (0 = the rest of the run), and a hard cutoff after which the weight is 0. It is a pure
  function of the step, so it needs no checkpointed state.
* :class:`SimilarityGate` follows an exponential moving average of the alignment score and switches
  the term off once the average reaches a threshold: for good (``permanent``) or until the average drops
  below it again (``recoverable``). Its average and on/off flag are state, saved with the regularizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")


@dataclass(frozen=True)
class WeightSchedule:
    """The weight at each 0-based optimizer step.

    ``total_steps`` is the run's length; it only matters when ``decay_steps`` is 0 and the schedule
    decays (the decay then spans every step after warmup)."""

    base: float
    scheduler: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    lambda_end: float = 0.0
    power: float = 1.0
    cutoff_step: int = 0
    total_steps: int = 0

    @classmethod
    def from_options(cls, config, prefix: str) -> WeightSchedule:
        """The ``--<prefix>_lambda`` / ``_scheduler`` / ``_warmup_steps`` / ... options: CREPA and U-REPA
        declare the same schedule under their own prefix."""
        def option(name: str):
            return getattr(config, f"{prefix}_{name}")

        return cls(base=float(option("lambda")), scheduler=option("scheduler"), warmup_steps=option("warmup_steps"),
                   decay_steps=option("decay_steps"), lambda_end=float(option("lambda_end")),
                   power=float(option("power")), cutoff_step=option("cutoff_step"),
                   total_steps=config.max_train_steps or 0)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULES:
            raise ValueError(f"unknown weight schedule {self.scheduler!r}; use one of {', '.join(SCHEDULES)}")

    def cut_off(self, step: int) -> bool:
        """True once the hard cutoff is reached: the first ``cutoff_step`` steps (0, 1, ...,
        cutoff_step - 1) carry the term, later ones never do. A cutoff of 0 means no cutoff."""
        return self.cutoff_step > 0 and step >= self.cutoff_step

    def weight(self, step: int) -> float:
        if self.cut_off(step):
            return 0.0
        if step < self.warmup_steps:
            return self.base * step / self.warmup_steps
        if self.scheduler == "constant":
            return self.base
        progress = self.decay_progress(step - self.warmup_steps)
        span = self.base - self.lambda_end
        if self.scheduler == "linear":
            return self.lambda_end + span * (1.0 - progress)
        if self.scheduler == "cosine":
            return self.lambda_end + span * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lambda_end + span * (1.0 - progress) ** self.power

    def decay_progress(self, steps_after_warmup: int) -> float:
        """How far through the decay a step is, from 0 (its start) to 1 (finished, and after)."""
        length = self.decay_steps or max(self.total_steps - self.warmup_steps, 1)
        return min(max(steps_after_warmup / length, 0.0), 1.0)


class SimilarityGate:
    """Switches a term off when the moving average of its alignment score reaches ``threshold``.

    ``threshold`` None keeps the gate open forever (the average is still tracked, for the logs)."""

    @classmethod
    def from_options(cls, config, prefix: str) -> SimilarityGate:
        """``--<prefix>_similarity_threshold`` / ``_similarity_ema_decay`` / ``_threshold_mode``."""
        return cls(getattr(config, f"{prefix}_similarity_threshold"), getattr(config, f"{prefix}_similarity_ema_decay"),
                   getattr(config, f"{prefix}_threshold_mode"))

    def __init__(self, threshold: float | None, ema_decay: float = 0.99, mode: str = "permanent"):
        if mode not in THRESHOLD_MODES:
            raise ValueError(f"unknown threshold mode {mode!r}; use permanent or recoverable")
        self.threshold, self.ema_decay, self.mode = threshold, ema_decay, mode
        self.average: float | None = None
        self.switched_off = False

    @property
    def open(self) -> bool:
        return not self.switched_off

    @property
    def watching(self) -> bool:
        """Whether the score must still be measured: always, except after a permanent switch-off."""
        return not (self.switched_off and self.mode == "permanent")

    def observe(self, similarity: float) -> None:
        """Fold one step's score into the average and switch off (or, recoverable, back on)."""
        if self.average is None:
            self.average = similarity
        else:
            self.average = self.ema_decay * self.average + (1.0 - self.ema_decay) * similarity
        if self.threshold is None:
            return
        if self.average >= self.threshold:
            self.switched_off = True
        elif self.mode == "recoverable":
            self.switched_off = False

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "switched_off": self.switched_off}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average, self.switched_off = state["average"], state["switched_off"]
