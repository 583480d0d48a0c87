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


# --- mixed precision, attention kernel and VAE type (--mixed_precision, --attention_mechanism, --vae_dtype) ---

VAE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype_for(config) -> torch.dtype:
    """The type the model's frozen weights are held in.

    bf16 holds everything in bf16. fp16 holds a LoRA's frozen base in fp16 (the adapters are fp32), but
    full training keeps fp32 weights: the loss scaler cannot unscale fp16 gradients, and fp16 weights
    would lose small updates to rounding; autocast still runs the matmuls in fp16.
    """
    if config.mixed_precision == "bf16":
        return torch.bfloat16
    if config.mixed_precision == "fp16" and config.model_type == "lora":
        return torch.float16
    return torch.float32


def enable_fp16_loss_scaling(accelerator) -> None:
    """Give a CPU run under ``--mixed_precision fp16`` the autocast and gradient scaler accelerate gives GPUs.

    accelerate skips both on CPU (the run would silently train in fp32) although torch has fp16 CPU
    autocast and a CPU ``GradScaler``. Must run before ``accelerator.prepare``, which wraps the model's
    forward in autocast and hands the scaler to the optimizer.
    """
    if accelerator.mixed_precision != "fp16" or accelerator.scaler is not None:
        return
    if accelerator.device.type != "cpu":
        return
    from accelerate.utils import get_grad_scaler

    accelerator.native_amp = True
    accelerator.scaler = get_grad_scaler(accelerator.distributed_type)


def apply_attention_backend(denoiser: torch.nn.Module, mechanism: str | None, device: torch.device) -> str | None:
    """Route the denoiser's attention through diffusers' dispatcher backend for ``--attention_mechanism``.

    Returns the backend name set, or None for the default (PyTorch SDPA, nothing to change). Raises
    ConfigError when the backend's package is missing, its hardware is absent, or the denoiser's
    attention layers do not go through the dispatcher (classic UNet processors call SDPA directly, so
    setting a backend would silently change nothing).
    """
    from simpletuner.options import ConfigError
    from simpletuner.options.precision_rules import (BACKEND_PACKAGES, CUDA_ONLY, DISPATCHER_BACKENDS, NO_CPU_BACKWARD,
                                                     cpu_backward_message)

    mechanism = mechanism or "diffusers"
    backend = DISPATCHER_BACKENDS[mechanism]
    if backend is None:
        return None
    flag = f"`--attention_mechanism {mechanism}`"
    if mechanism in CUDA_ONLY and torch.device(device).type != "cuda":
        raise ConfigError(f"{flag} runs only on NVIDIA GPUs, and this run is on {torch.device(device).type}; use "
                          "`--attention_mechanism diffusers`, native-math or native-flash")
    if mechanism in NO_CPU_BACKWARD and torch.device(device).type == "cpu":
        raise ConfigError(cpu_backward_message(mechanism))
    routed = [module for module in denoiser.modules() if hasattr(getattr(module, "processor", None), "_attention_backend")]
    if not routed:
        raise ConfigError(f"{flag}: the attention layers of {type(denoiser).__name__} call PyTorch SDPA directly, "
                          "not diffusers' attention dispatcher, so no other backend can be set; use "
                          "`--attention_mechanism diffusers`")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except RuntimeError as error:
        package = BACKEND_PACKAGES.get(mechanism, ("", "its package"))[1]
        raise ConfigError(f"{flag} needs {package}, which this environment cannot use ({error})") from None
    denoiser.set_attention_backend(backend)
    return backend


def attention_backends_in_use(denoiser: torch.nn.Module) -> set[str]:
    """The dispatcher backends the denoiser's attention processors are set to ("default" where unset)."""
    found = set()
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            found.add("default" if backend is None else getattr(backend, "value", str(backend)))
    return found


def apply_vae_dtype(model, vae_dtype: str | None) -> torch.dtype | None:
    """Cast the VAE to ``--vae_dtype`` after the family placed it; encoding casts pixels to ``vae.dtype``."""
    if vae_dtype in (None, "default"):
        return None
    vae = getattr(model, "vae", None)
    if vae is None:
        from simpletuner.options import ConfigError

        raise ConfigError(f"`--vae_dtype {vae_dtype}`: {type(model).__name__} has no VAE; remove the option")
    dtype = VAE_DTYPES[vae_dtype]
    vae.to(dtype=dtype)
    return dtype


def apply_model_precision(model, config, device) -> None:
    """``--vae_dtype`` and ``--attention_mechanism`` on a loaded model (Trainer._load_model)."""
    apply_vae_dtype(model, config.vae_dtype)
    apply_attention_backend(model.denoiser, config.attention_mechanism, device)
