"""LoRA adapters through PEFT: inject, collect, save and load them for any family's denoiser.

The saved layout is the one the family's diffusers pipeline loads with ``load_lora_weights``
(``<denoiser>.<module path>.lora_A/lora_B.weight``); the adapter config travels in the file's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def add_lora(denoiser: torch.nn.Module, target_modules: list[str], rank: int, alpha: float | None,
             dropout: float) -> dict[str, Any]:
    """Freeze ``denoiser`` and attach a trainable LoRA; returns the adapter config as plain data."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )
    denoiser.requires_grad_(False)
    denoiser.add_adapter(config)
    for parameter in denoiser.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # adapters train in fp32 even on a bf16 base
    return {"r": rank, "lora_alpha": config.lora_alpha, "lora_dropout": dropout,
            "target_modules": sorted(target_modules), "init_lora_weights": "gaussian"}


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, named as diffusers' LoRA loaders expect (without the denoiser prefix)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_weights_into(denoiser: torch.nn.Module, file: Path, prefix: str) -> None:
    """Restore adapter weights saved by :func:`lora_state_dict` (a checkpoint being resumed)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(file)
    own = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}
    result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(own), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{file}: adapter keys that match no module of the model: {unexpected[:5]}")


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
