"""What a training method is to the trainer: the contract every method (SFT, causal SFT, distillation)
fulfils, so the loop in simpletuner/training/trainer.py never names a method.

A method turns one batch into a loss. Besides the loss it returns named log terms, which the trainer
sends to the trackers under ``loss/<term>``, and it may bring trainable modules of its own (a
distillation method's fake-score network, a discriminator head); their parameters join the optimizer
and their weights, like any state the method keeps, travel in the checkpoint through
:meth:`TrainingMethod.state_dict` and come back on resume through :meth:`TrainingMethod.load_state_dict`.

Distillation widened the seam once (issue 17), in two places. A method may train modules on a loss of
its own, with its own optimizer and schedule (a fake score, a discriminator), stepping them inside
``compute_loss``; the trainer then hands it a :class:`MethodContext` through the optional ``bind``. And
a step may leave the model alone (DMD2 moves the student every ``student_update_freq`` steps, its
critic every step): :attr:`LossOutput.updates_model` tells the trainer to skip the model's backward,
optimizer step and EMA update for that step. Both keep the loop free of any method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch


@dataclass
class LossOutput:
    """The loss of one batch (what backward runs on) and the named terms it is made of, as plain floats."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    #: False on a step whose loss trains only the method's own modules: no backward, optimizer step or
    #: EMA update for the model (the LR schedule still advances, it counts steps).
    updates_model: bool = True


@dataclass
class MethodContext:
    """What the trainer gives a method that optimizes modules of its own (optional ``bind(context)``)."""

    #: averages the given parameters' gradients over the processes (identity on one process)
    average_gradients: Callable[[list[torch.nn.Parameter]], None]


@runtime_checkable
class TrainingMethod(Protocol):
    """How the loss of one batch is computed; one instance per run, built by the method registry."""

    #: Set by the trainer while ``--train_text_encoder`` trains the encoders: prompts must be encoded
    #: live, with gradients, instead of read from the text-embed cache.
    encode_text_live: bool

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        """The loss of ``batch`` at optimizer step ``step`` and its named terms."""
        ...

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules the method trains besides the denoiser (empty for SFT); the trainer adds their
        parameters to the optimizer."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs from the method (its modules' weights, counters)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


class Stateless:
    """The three component methods for a method or regularizer that trains no module of its own and
    keeps nothing between steps (its randomness comes from the RNGs the checkpoint restores)."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
