"""The hardware the wizard fits its questions and defaults to.

Some answers only make sense on some machines: mixed precision pays off on an accelerator and not on
a CPU, RamTorch and CUDA streams need NVIDIA's CUDA, and offloading weights to CPU memory saves
nothing when there is no accelerator memory to save. The wizard asks torch once per run (imported
here, inside the function, so ``simpletuner --help`` and config validation stay free of it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """What this machine trains on.

    Attributes:
        accelerator: ``cuda`` (NVIDIA, or AMD through ROCm's CUDA interface), ``mps`` (Apple) or
            None (CPU only).
        gpu_count: the CUDA devices torch sees (1 for mps, 0 for a CPU).
    """

    accelerator: str | None = None
    gpu_count: int = 0

    @property
    def cuda(self) -> bool:
        return self.accelerator == "cuda"

    def describe(self) -> str:
        if self.accelerator == "cuda":
            return f"{self.gpu_count} CUDA GPU(s)"
        return "an Apple GPU (mps)" if self.accelerator == "mps" else "no GPU (CPU only)"


def detect_machine() -> Machine:
    """Ask torch which accelerator is usable; a missing or broken torch means a CPU."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - any import failure leaves the CPU, which always works
        return Machine()
    if torch.cuda.is_available():
        return Machine("cuda", torch.cuda.device_count())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Machine("mps", 1)
    return Machine()
