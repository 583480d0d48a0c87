"""Exponential moving average of the trained weights, via diffusers' ``EMAModel``.

A thin wrapper so the trainer sees one small object with ``update / state_dict / load_state_dict``
and a context manager that swaps the averaged weights in (for saving) and back out.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class EmaWeights:
    """EMA over a fixed list of parameters (the trainable ones)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self._parameters = list(parameters)
        self._ema = EMAModel(self._parameters, decay=decay)

    def update(self) -> None:
        """Blend the current weights into the average (call after each optimizer step)."""
        self._ema.step(self._parameters)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily replace the live weights with the averaged ones."""
        self._ema.store(self._parameters)
        self._ema.copy_to(self._parameters)
        try:
            yield
        finally:
            self._ema.restore(self._parameters)

    def state_dict(self) -> dict:
        return self._ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ema.load_state_dict(state)
