"""Validation rules for ``--mixed_precision``, ``--attention_mechanism`` and ``--vae_dtype``. Torch-free: packages are looked up with ``importlib.util.find_spec``; torch is imported
only to read a GPU's compute capability, and only for ``--mixed_precision fp8``.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.options import ConfigError
from simpletuner.options.quantization_rules import _cuda_capability, has_package, machine_device

#: ``--attention_mechanism`` value -> diffusers' attention dispatcher backend (``AttentionBackendName``).
#: None: leave the dispatcher at its default, PyTorch's scaled_dot_product_attention.
DISPATCHER_BACKENDS: dict[str, str | None] = {
    "diffusers": None,
    "xformers": "xformers",
    "flash-attn": "flash",
    "flash-attn-2": "flash",
    "flash-attn-3": "_flash_3",
    "flash-attn-3-varlen": "_flash_varlen_3",
    "flex": "flex",
    "cudnn": "_native_cudnn",
    "native-efficient": "_native_efficient",
    "native-flash": "_native_flash",
    "native-math": "_native_math",
    "native-npu": "_native_npu",
    "native-xla": "_native_xla",
    "sageattention": "sage",
    "sageattention-int8-fp16-triton": "_sage_qk_int8_pv_fp16_triton",
    "sageattention-int8-fp16-cuda": "_sage_qk_int8_pv_fp16_cuda",
    "sageattention-int8-fp8-cuda": "_sage_qk_int8_pv_fp8_cuda",
}
#: The module each backend imports, and the package to install for it.
BACKEND_PACKAGES: dict[str, tuple[str, str]] = {
    "xformers": ("xformers", "xformers"),
    "flash-attn": ("flash_attn", "flash-attn"),
    "flash-attn-2": ("flash_attn", "flash-attn"),
    "flash-attn-3": ("flash_attn_interface", "flash-attn 3 (built from the hopper/ folder of its repository)"),
    "flash-attn-3-varlen": ("flash_attn_interface", "flash-attn 3 (built from the hopper/ folder of its repository)"),
    "flex": ("torch.nn.attention.flex_attention", "torch>=2.5"),
    "native-npu": ("torch_npu", "torch_npu"),
    "native-xla": ("torch_xla", "torch_xla"),
    **{name: ("sageattention", "sageattention") for name in DISPATCHER_BACKENDS if name.startswith("sage")},
}
#: Backends whose kernels exist only on NVIDIA GPUs.
CUDA_ONLY = frozenset({"xformers", "flash-attn", "flash-attn-2", "flash-attn-3", "flash-attn-3-varlen", "cudnn",
                       "native-efficient", *(name for name in DISPATCHER_BACKENDS if name.startswith("sage"))})
#: Backends without a backward pass on CPU (torch's FlexAttention raises NotImplementedError there).
NO_CPU_BACKWARD = frozenset({"flex"})
#: Compute capability from which GPUs have float8 matmuls (Ada Lovelace, Hopper and later).
FP8_CAPABILITY = (8, 9)


def check_mixed_precision(config) -> None:
    """no, bf16 and fp16 train; fp8 is refused with the reason (no float8 hardware, or not built yet)."""
    if config.mixed_precision != "fp8":
        return
    capability = _cuda_capability() if machine_device() == "cuda" else None
    if capability is None or tuple(capability) < FP8_CAPABILITY:
        found = f"compute capability {capability[0]}.{capability[1]}" if capability else f"device {machine_device()}"
        raise ConfigError(f"`--mixed_precision fp8` needs float8 matrix units (an NVIDIA GPU of compute capability "
                          f"8.9 or newer: Ada, Hopper, Blackwell); this machine has none ({found}). Use "
                          "`--mixed_precision bf16` (or fp16 on GPUs without bf16)")
    raise ConfigError("`--mixed_precision fp8` (float8 training through accelerate) is not supported yet; use "
                      "`--mixed_precision bf16`, or store the frozen base in float8 with `--base_model_precision "
                      "fp8-torchao`")


def check_attention_mechanism(config) -> None:
    """The backend's package is installed and its hardware present; SLA and SageAttention are refused."""
    name = config.attention_mechanism or "diffusers"
    flag = f"`--attention_mechanism {name}`"
    if name == "sla":
        raise ConfigError(f"{flag}: Sparse-Linear Attention is not part of diffusers' attention dispatcher and is not "
                          "supported yet; use diffusers (PyTorch SDPA) or flex")
    if name in BACKEND_PACKAGES:
        module, package = BACKEND_PACKAGES[name]
        if not has_package(module):
            raise ConfigError(f"{flag} needs the {package} package, which is not installed; install it "
                              "or use `--attention_mechanism diffusers` (PyTorch SDPA)")
    if name.startswith("sage"):
        raise ConfigError(f"{flag}: SageAttention kernels have no backward pass (diffusers raises in backward), so "
                          "they cannot train; using them for validation only (`--sageattention_usage inference`) "
                          "is not supported yet. Use diffusers, flash-attn or flex for training")
    device = machine_device()
    if name in CUDA_ONLY and device != "cuda":
        raise ConfigError(f"{flag} runs only on NVIDIA GPUs, and this machine trains on {device}; use "
                          "`--attention_mechanism diffusers`, native-math or native-flash")
    if name in NO_CPU_BACKWARD and device == "cpu":
        raise ConfigError(cpu_backward_message(name))


def cpu_backward_message(name: str) -> str:
    return (f"`--attention_mechanism {name}`: PyTorch's FlexAttention has no backward pass on CPU, so it cannot "
            "train here; use diffusers, native-math or native-flash on CPU, and flex on a GPU")


def check_vae_dtype(config) -> None:
    """A pixel-space family (``FamilyInfo.pixel_space``, e.g. DeepFloyd) has no VAE whose type could be set."""
    from simpletuner.models.registry import FAMILIES

    info = FAMILIES.get(config.model_family or "")
    if config.vae_dtype not in (None, "default") and info is not None and info.pixel_space:
        raise ConfigError(f"`--vae_dtype {config.vae_dtype}` has no effect: the {config.model_family} model works "
                          "on pixels and has no VAE; remove it")


PRECISION_RULES: tuple[Callable, ...] = (check_mixed_precision, check_attention_mechanism, check_vae_dtype)
