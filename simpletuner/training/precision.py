"""Numeric precision switches of a run: TF32 matmuls and the precision gradients accumulate in.

``--disable_tf32``: NVIDIA GPUs from Ampere on can run fp32 matmuls and convolutions in TF32 (10-bit
mantissa), which is several times faster and what trainers normally allow; the flag forces strict
fp32 when exact reproduction matters more than speed.

``--gradient_precision fp32``: when the trained weights themselves are bf16/fp16 (full training
with ``--mixed_precision bf16``), each backward pass adds its gradient to ``param.grad`` in that low
precision, and over several accumulation steps the rounding errors add up. With fp32 gradients
every micro-batch's gradient is added into an fp32 buffer instead; it is written back (rounded once)
just before clipping and the optimizer step. fp32 weights (e.g. LoRA adapters) need nothing.
"""

from __future__ import annotations

import torch


def configure_tf32(disable: bool) -> None:
    """Allow TF32 for matmuls and cuDNN convolutions unless ``disable``; harmless without CUDA."""
    allowed = not disable
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


class Fp32GradientAccumulator:
    """Sums each low-precision parameter's gradients in fp32 across micro-batches.

    A post-accumulate-grad hook moves the fresh gradient into the fp32 buffer and clears
    ``param.grad``, so the low-precision ``.grad`` never holds a running sum.
    """

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = [p for p in parameters if p.dtype in (torch.bfloat16, torch.float16)]
        self.buffers: dict[int, torch.Tensor] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._absorb) for p in self.parameters]

    @property
    def active(self) -> bool:
        return bool(self.parameters)

    def _absorb(self, parameter: torch.nn.Parameter) -> None:
        grad = parameter.grad
        if grad is None:
            return
        key = id(parameter)
        if key in self.buffers:
            self.buffers[key].add_(grad.float())
        else:
            self.buffers[key] = grad.float()
        parameter.grad = None

    def write_back(self) -> None:
        """Put the accumulated sums into ``param.grad`` (in the parameter's dtype) and reset."""
        for parameter in self.parameters:
            buffer = self.buffers.pop(id(parameter), None)
            if buffer is not None:
                parameter.grad = buffer.to(parameter.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
