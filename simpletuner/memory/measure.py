"""Measured memory: the peak of live tensor bytes while a piece of real work runs.

PyTorch keeps allocator statistics for CUDA but not for the CPU. :class:`LiveTensorBytes` is a
dispatch mode that sees every tensor an operator returns (forward, backward and optimizer ops alike)
and follows each storage until it is freed, so it knows the live bytes at every moment and their
peak. Tensors that existed before the measured call count only when they belong to a module or
optimizer passed in as ``track`` (weights, buffers, gradients, optimizer state); a view shares its
base's storage and is not counted twice; a tensor subclass that wraps others (quanto's and
torchao's quantized weights) counts as the tensors inside it. On CUDA the allocator's own
``max_memory_allocated`` is read as well. (torch's ``MemTracker`` does the same bookkeeping but assumes every parameter
requires a gradient, which frozen base weights do not.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of every storage seen on ``device``, their running peak and what made the peak up."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.live: dict[int, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.current_by_kind: dict[str, int] = {}
        self.peak_by_kind: dict[str, int] = {}

    def add(self, tensor: torch.Tensor, kind: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device.type or tensor.is_meta:
            return
        if is_traceable_wrapper_subclass(tensor):
            # a quantized weight (quanto, torchao): its storage has the unquantized size, the data and
            # scales it holds are its inner tensors
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                self.add(getattr(tensor, name), kind)
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
            return
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = (nbytes, kind)
        self.current += nbytes
        self.current_by_kind[kind] = self.current_by_kind.get(kind, 0) + nbytes
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_kind = dict(self.current_by_kind)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]
            self.current_by_kind[entry[1]] -= entry[0]

    def track(self, items: Iterable[Any]) -> None:
        for item in items:
            if isinstance(item, torch.nn.Module):
                for param in item.parameters():
                    self.add(param, "weights")
                    if param.grad is not None:
                        self.add(param.grad, "gradients")
                for buffer in item.buffers():
                    self.add(buffer, "weights")
            elif isinstance(item, torch.optim.Optimizer):
                for state in item.state.values():
                    for value in state.values():
                        self.add(value, "optimizer")
                for group in item.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            self.add(param.grad, "gradients")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.add(tensor, "created during the call")
        return out


@dataclass
class MeasuredPeak:
    """Peak live bytes on one device during the measured call, and what the peak was made of."""

    device: str
    total: int
    by_kind: dict[str, int] = field(default_factory=dict)
    result: Any = None
    allocator_peak: int | None = None  # CUDA's own max_memory_allocated over the call

    def __str__(self) -> str:
        from simpletuner.memory.units import format_size

        parts = ", ".join(f"{kind} {format_size(value)}" for kind, value in self.by_kind.items() if value)
        return f"{format_size(self.total)} on {self.device} ({parts})"


def measure_peak(function: Callable[[], Any], track: Iterable[Any] = (), device: str | torch.device = "cpu"
                 ) -> MeasuredPeak:
    """Run ``function()`` and return the peak of live tensor bytes on ``device`` while it ran.

    ``track``: modules and optimizers whose tensors existed before the call and belong in the
    count (weights, gradients, optimizer state).
    """
    device = torch.device(device)
    tracker = LiveTensorBytes(device)
    tracker.track(track)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tracker:
        result = function()
    allocator_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocator_peak = torch.cuda.max_memory_allocated(device)
    return MeasuredPeak(str(device), tracker.peak, dict(tracker.peak_by_kind), result, allocator_peak)
