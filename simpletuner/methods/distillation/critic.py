"""The critic side of a distillation run: the modules the method trains on a loss of their own (the fake
score's adapter, the discriminator head), with their own AdamW optimizer and LR schedule.

Why not the trainer's optimizer: the critic and the student minimise different losses and step at
different rates (``student_update_freq``), and the critic must never be moved by the student's loss
(whose gradient passes through the fake score and the discriminator). So the critic owns its
optimizer, runs its own backward inside the method, and its state (weights, optimizer, schedule, step
count) travels in the method's part of the checkpoint.

The discriminator head is built when the first features arrive (their width is the model's); a
checkpoint's critic state loaded before then waits until the head exists.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from simpletuner.methods.distillation.discriminator import DiscriminatorHead


#: The discriminator head's initialisation seed.
HEAD_SEED = 20240514


class Critic:
    def __init__(self, parameters: list[torch.nn.Parameter], learning_rate: float, warmup_steps: int,
                 weight_decay: float, betas: tuple[float, float], max_grad_norm: float | None):
        self.parameters = list(parameters)
        self.head: DiscriminatorHead | None = None
        self.learning_rate = learning_rate
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.parameters or [torch.nn.Parameter(torch.zeros(()))],
                                           lr=learning_rate, betas=betas, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)
        self.steps = 0
        self._pending: dict[str, Any] | None = None
        self.average_gradients: Callable[[list[torch.nn.Parameter]], None] = lambda parameters: None

    def discriminator(self, features: torch.Tensor) -> DiscriminatorHead:
        """The head for ``features``, built (and added to the optimizer) on first use."""
        if self.head is None:
            # its own seed: building it must not move the global RNG, or a resumed run (which builds it at
            # another step than the original) would draw different noise from then on
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(HEAD_SEED)
                self.head = DiscriminatorHead.for_features(features).to(features.device)
            warmup = self.schedule.lr_lambdas[0]  # the head follows the same schedule from where it stands
            self.optimizer.add_param_group({"params": list(self.head.parameters()),
                                            "lr": self.learning_rate * warmup(self.schedule.last_epoch),
                                            "initial_lr": self.learning_rate})
            self.schedule.base_lrs.append(self.learning_rate)
            self.schedule.lr_lambdas.append(warmup)
            if self._pending is not None:
                self._apply(self._pending)
                self._pending = None
        return self.head

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return self.parameters + (list(self.head.parameters()) if self.head is not None else [])

    def step(self, loss: torch.Tensor) -> float | None:
        """One optimizer step of the critic on ``loss``; returns the gradient norm before clipping."""
        parameters = self.trained_parameters()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=parameters)
        self.average_gradients(parameters)
        norm = None
        if self.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm))
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"head": None if self.head is None else self.head.state_dict(),
                "head_shape": None if self.head is None else self.head.shape_key,
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["head"] is not None and self.head is None:
            self._pending = state  # applied when the first forward builds the head
            return
        self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        if state["head"] is not None:
            self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.steps = int(state["steps"])
