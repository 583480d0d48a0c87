"""Exponential moving average of the trained weights, via diffusers' ``EMAModel``.

A thin wrapper so the trainer sees one small object with ``update / state_dict / load_state_dict``
and a context manager that swaps the averaged weights in (for validation and saving) and back out.

Where the average lives (``--ema_device``): ``accelerator`` keeps it beside the weights (fast, costs
device memory); ``cpu`` keeps it in host memory. With ``cpu``, each update normally moves the average
to the accelerator, blends, and moves it back; ``--ema_cpu_only`` blends on the CPU instead, copying
the live weights over (on a CPU-only machine the two are the same). ``--ema_update_interval N``
blends every N optimizer steps; ``--ema_foreach_disable`` updates tensor by tensor.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class EmaSettings:
    decay: float = 0.995
    device: str = "cpu"
    cpu_only: bool = False
    update_interval: int = 1
    foreach: bool = True

    @classmethod
    def from_config(cls, config) -> "EmaSettings":
        return cls(decay=config.ema_decay, device=config.ema_device or "cpu", cpu_only=bool(config.ema_cpu_only),
                   update_interval=config.ema_update_interval or 1, foreach=not config.ema_foreach_disable)


class EmaWeights:
    """EMA over a fixed list of parameters (the trainable ones)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float | None = None,
                 settings: EmaSettings | None = None):
        from diffusers.training_utils import EMAModel

        self.settings = settings or EmaSettings(decay=decay if decay is not None else 0.995)
        self._parameters = list(parameters)
        self._live_device = self._parameters[0].device if self._parameters else torch.device("cpu")
        self._ema = EMAModel(self._parameters, decay=self.settings.decay, foreach=self.settings.foreach)
        self._ema.to(self.storage_device)
        self.updates_seen = 0

    @property
    def storage_device(self) -> torch.device:
        return torch.device("cpu") if self.settings.device == "cpu" else self._live_device

    def update(self) -> None:
        """Count an optimizer step and blend the current weights in every ``update_interval`` steps."""
        self.updates_seen += 1
        if self.updates_seen % self.settings.update_interval:
            return
        if self.storage_device == self._live_device:
            self._ema.step(self._parameters)
        elif self.settings.cpu_only:
            # EMAModel only blends parameters that require grad; the CPU copies must say so too.
            self._ema.step([p.detach().to("cpu").requires_grad_(p.requires_grad) for p in self._parameters])
        else:
            self._ema.to(self._live_device)
            self._ema.step(self._parameters)
            self._ema.to(self.storage_device)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily replace the live weights with the averaged ones (restored exactly after)."""
        self._ema.store(self._parameters)
        self._ema.copy_to(self._parameters)
        try:
            yield
        finally:
            self._ema.restore(self._parameters)

    def state_dict(self) -> dict:
        return {**self._ema.state_dict(), "updates_seen": self.updates_seen}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.updates_seen = int(state.pop("updates_seen", 0))
        self._ema.load_state_dict(state)
        self._ema.to(self.storage_device)
