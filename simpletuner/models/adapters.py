"""LoRA adapters through PEFT: inject, collect, save and load them for any family's denoiser.

The saved layout is the one the family's diffusers pipeline loads with ``load_lora_weights``
(``<denoiser>.<module path>.lora_A/lora_B.weight``); the adapter config travels in the file's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def add_lora(denoiser: torch.nn.Module, target_modules: list[str], rank: int, alpha: float | None,
             dropout: float, init_lora_weights: bool | str = "gaussian", use_dora: bool = False,
             loftq_config: dict | None = None, custom_modules: dict | None = None) -> dict[str, Any]:
    """Freeze ``denoiser`` and attach a trainable LoRA; returns the adapter config as plain data.

    ``init_lora_weights`` and ``use_dora`` are PEFT's; ``custom_modules`` maps layer types to custom
    PEFT LoRA layers (SingLoRA, see simpletuner/models/singlora.py).
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
        target_modules=target_modules,
        use_dora=use_dora,
        **({"loftq_config": loftq_config} if loftq_config else {}),
    )
    if custom_modules:
        config._register_custom_module(custom_modules)
    denoiser.requires_grad_(False)
    if _has_diffusers_peft_mixin(denoiser):
        denoiser.add_adapter(config)
    else:
        # Everything else (text encoders, PixArt's transformer) gets PEFT's own injection. It builds the
        # same layers and records ``peft_config`` on the model, so lora_state_dict / load_lora_weights_into
        # work. transformers' ``add_adapter`` is avoided on purpose: it refuses to run unless the installed
        # peft is at least the version that transformers release names, which breaks training whenever
        # the two packages move at different speeds (transformers 5.24 demanded peft 0.22 before it was released).
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, denoiser, adapter_name="default")
    for parameter in denoiser.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # adapters train in fp32 even on a bf16 base
    # The returned config travels in the saved file for loaders to rebuild the adapter: dropout is a
    # training-time regulariser, and a loader that kept it would make every inference sample random.
    return {"r": rank, "lora_alpha": config.lora_alpha, "lora_dropout": 0.0,
            "target_modules": sorted(target_modules), "init_lora_weights": init_lora_weights,
            **({"use_dora": True} if use_dora else {})}


def _has_diffusers_peft_mixin(module: torch.nn.Module) -> bool:
    """diffusers models carry ``add_adapter`` from diffusers' PEFT mixin, whose version gate is diffusers'
    own; transformers models carry a method of the same name with a stricter gate (see :func:`add_lora`)."""
    from diffusers.loaders.peft import PeftAdapterMixin

    return isinstance(module, PeftAdapterMixin)


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, named as diffusers' LoRA loaders expect (without the denoiser prefix)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_weights_into(denoiser: torch.nn.Module, file: Path, prefix: str) -> None:
    """Restore adapter weights saved by :func:`lora_state_dict` (a checkpoint being resumed).

    ``prefix`` is the pipeline component (``unet``, ``text_encoder``); the file may be in the diffusers
    or the ComfyUI layout (detected from its keys, see simpletuner/models/lora_formats.py).
    """
    from simpletuner.models import lora_formats

    lora_file = lora_formats.LoraFile.read(file)
    states, alphas, _ = lora_formats.peft_state_from_file(lora_file, {prefix: denoiser}, naming=None)
    lora_formats.load_peft_state(denoiser, states.get(prefix, {}), alphas.get(prefix), source=str(file))


def add_file_metadata(file: Path, extra: dict[str, str]) -> None:
    """Merge provenance into a safetensors file's metadata (rewrites the small adapter file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    metadata.update(extra)
    temp = file.with_suffix(".tmp")
    save_file(tensors, str(temp), metadata=metadata)
    temp.replace(file)
