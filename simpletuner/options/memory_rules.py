"""Validation rules for the memory options: offloading, block swap, RamTorch, checkpointing backends.

Torch-free like every rule. Two options that manage the same weights are refused together, naming
both flags; an option that needs a GPU says so when none is visible; an option that would change
nothing on this machine (a CPU-only run offloading to the CPU) gets a warning, not an error, so the
same config still validates where it will run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from simpletuner.models.registry import family_info
from simpletuner.options import ConfigError
from simpletuner.options.adapter_rules import cuda_visible

#: Pairs of options that manage the same weights; at most one of each pair may be on.
EXCLUSIVE = (
    ("enable_group_offload", "enable_model_cpu_offload",
     "both decide where the text encoders and VAE wait between uses; pick one"),
    ("enable_group_offload", "ramtorch", "both stream weights from CPU memory with their own hooks; pick one"),
    ("enable_group_offload", "offload_during_startup",
     "group offloading keeps the text encoders and VAE off the accelerator already"),
    ("enable_model_cpu_offload", "offload_during_startup",
     "model CPU offload keeps the text encoders and VAE off the accelerator already"),
    ("musubi_blocks_to_swap", "ramtorch", "both stream the denoiser's frozen weights from CPU memory; pick one"),
    ("enable_model_cpu_offload", "ramtorch_text_encoder",
     "both decide where the text encoders' weights live; pick one"),
)
GROUP_OFFLOAD_OPTIONS = ("group_offload_type", "group_offload_blocks_per_group", "group_offload_use_stream",
                         "group_offload_to_disk_path")
RAMTORCH_OPTIONS = ("ramtorch_target_modules", "ramtorch_text_encoder", "ramtorch_vae", "ramtorch_transformer_percent",
                    "ramtorch_text_encoder_percent", "ramtorch_disable_extensions")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|xpu(:\d+)?|mps)$")
#: Options that move weights or activations between devices; on a CPU-only run they move nothing.
DEVICE_MOVING = ("enable_model_cpu_offload", "enable_group_offload", "offload_during_startup", "offload_during_save",
                 "musubi_blocks_to_swap")


def accelerator_visible() -> bool:
    """Whether a CUDA GPU is visible (tests monkeypatch this to exercise GPU-only paths on the CPU)."""
    return cuda_visible()


def _on(config, name: str) -> bool:
    return getattr(config, name) not in (None, False, 0, "", [], "none")


def _explicit(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def check_exclusive(config) -> None:
    for first, second, why in EXCLUSIVE:
        if _on(config, first) and _on(config, second):
            raise ConfigError(f"`--{first}` and `--{second}` cannot be combined: {why}; remove one of them")


def check_checkpointing_backend(config) -> None:
    if config.gradient_checkpointing_backend != "unsloth":
        return
    if not config.gradient_checkpointing:
        raise ConfigError("`--gradient_checkpointing_backend unsloth` changes how checkpointed activations are kept; "
                          "add `--gradient_checkpointing true` or remove it")
    if not accelerator_visible():
        raise ConfigError("`--gradient_checkpointing_backend unsloth` parks activations in CPU memory while they wait "
                          "for the backward pass: it needs CUDA (on a CPU-only run they are in CPU memory already), and "
                          "no GPU is visible on this machine; use `--gradient_checkpointing_backend torch`")


def check_group_offload(config) -> None:
    if not config.enable_group_offload:
        changed = [name for name in GROUP_OFFLOAD_OPTIONS if _explicit(config, name)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` only applies with `--enable_group_offload true`; add it or remove "
                              f"`--{changed[0]}`")
        return
    if config.group_offload_blocks_per_group is None or config.group_offload_blocks_per_group < 1:
        raise ConfigError(f"`--group_offload_blocks_per_group` = {config.group_offload_blocks_per_group} must be at "
                          "least 1")
    if config.group_offload_type == "leaf_level" and _explicit(config, "group_offload_blocks_per_group"):
        raise ConfigError("`--group_offload_blocks_per_group` groups blocks for `--group_offload_type block_level`; "
                          "leaf_level moves each layer on its own. Remove one of them")
    folder = config.group_offload_to_disk_path
    if folder:
        path = Path(folder)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"`--group_offload_to_disk_path` {folder!r} is a file; give a folder")
        if existing is None or not existing.is_dir():
            raise ConfigError(f"`--group_offload_to_disk_path` {folder!r}: no parent folder exists to create it in")


def check_block_swap(config) -> None:
    count = config.musubi_blocks_to_swap or 0
    if count < 0:
        raise ConfigError(f"`--musubi_blocks_to_swap` = {count} must not be negative (0 turns block swap off)")
    if count == 0:
        if _explicit(config, "musubi_block_swap_device") and config.musubi_block_swap_device != "cpu":
            raise ConfigError("`--musubi_block_swap_device` only applies with `--musubi_blocks_to_swap` > 0; add it or "
                              "remove `--musubi_block_swap_device`")
        return
    info = family_info(config.model_family)
    if info.latent_patch_size <= 1:
        what = "is a UNet" if info.planner is not None and info.planner.activation_kind == "unet" else \
            "has blocks that block swap has not been tested on"
        raise ConfigError(f"`--musubi_blocks_to_swap` swaps repeated transformer blocks; {info.name}'s denoiser {what}. "
                          "Use `--gradient_checkpointing`, a quantized `--base_model_precision` or "
                          "`--enable_model_cpu_offload` instead")
    if config.model_type != "lora":
        raise ConfigError("`--musubi_blocks_to_swap` keeps frozen weights off the accelerator; with `--model_type full` "
                          "every weight trains (its gradient and optimizer state stay on the accelerator). Use "
                          "`--model_type lora` or remove it")
    _check_unquantized("musubi_blocks_to_swap", config)
    if not DEVICE_PATTERN.match(str(config.musubi_block_swap_device)):
        raise ConfigError(f"`--musubi_block_swap_device {config.musubi_block_swap_device}` is not a device; use cpu or "
                          "cuda:N")


def _check_unquantized(name: str, config) -> None:
    precision = config.base_model_precision
    if precision not in (None, "no_change"):
        raise ConfigError(f"`--{name}` and `--base_model_precision {precision}` cannot be combined yet: swapping "
                          "quantized tensor subclasses between devices is not supported. Remove one of them")


def check_ramtorch(config) -> None:
    if not config.ramtorch:
        changed = [name for name in RAMTORCH_OPTIONS if _explicit(config, name)
                   and getattr(config, name) not in (False,)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` only applies with `--ramtorch true`; add it or remove `--{changed[0]}`")
        return
    if not accelerator_visible():
        raise ConfigError("`--ramtorch` streams weights from CPU memory to a GPU and needs CUDA; no GPU is visible on "
                          "this machine. Remove it")
    if config.model_type != "lora":
        raise ConfigError("`--ramtorch` streams frozen weights; with `--model_type full` every weight trains. Use "
                          "`--model_type lora` or remove it")
    _check_unquantized("ramtorch", config)
    for name in ("ramtorch_transformer_percent", "ramtorch_text_encoder_percent"):
        value = getattr(config, name)
        if value is not None and not 0 <= value <= 100:
            raise ConfigError(f"`--{name}` = {value} must be between 0 and 100")
    if config.ramtorch_vae and family_info(config.model_family).pixel_space:
        raise ConfigError(f"`--ramtorch_vae`: {config.model_family} works on pixels and has no VAE; remove it")


def check_vae_options(config) -> None:
    if family_info(config.model_family).pixel_space:
        for name in ("vae_enable_slicing", "vae_enable_tiling"):
            if getattr(config, name):
                raise ConfigError(f"`--{name}`: {config.model_family} works on pixels and has no VAE; remove it")


def check_memory_budget(config) -> None:
    if config.memory_budget is not None:
        from simpletuner.memory.units import parse_size

        try:
            parse_size(config.memory_budget)
        except ValueError as error:
            raise ConfigError(f"`--memory_budget`: {error}") from None


def qkv_fusion_refusal(family: str | None) -> str:
    """Why ``--fuse_qkv_projections`` cannot work for ``family`` (``FamilyInfo.qkv_fusion_refusal``); empty
    when diffusers fuses its attention into the same computation (tests/memory/test_qkv_fusion.py)."""
    from simpletuner.models.registry import FAMILIES

    info = FAMILIES.get(family or "")
    return info.qkv_fusion_refusal if info is not None else "its attention layers have no fused form here yet"


def check_qkv_fusion(config) -> None:
    if not config.fuse_qkv_projections:
        return
    family = config.model_family
    why = qkv_fusion_refusal(family)
    if why:
        raise ConfigError(f"`--fuse_qkv_projections` is not available for {family}: {why}. Remove it")
    if config.model_type == "lora" and config.lora_type == "lycoris":
        raise ConfigError("`--fuse_qkv_projections` with `--lora_type lycoris`: a LyCORIS factorisation of the fused "
                          "matrix cannot be split back into separate query/key/value adapters for saving; use "
                          "`--lora_type standard` or remove `--fuse_qkv_projections`")
    if config.model_type == "lora" and config.peft_lora_mode == "singlora":
        raise ConfigError("`--fuse_qkv_projections` with `--peft_lora_mode singlora`: a SingLoRA of the fused matrix "
                          "has no exact per-projection form to save; remove one of them")
    if config.unet_attention_slice:
        raise ConfigError("`--fuse_qkv_projections` and `--unet_attention_slice` cannot be combined: sliced attention "
                          "projects query, key and value separately; remove one of them")
    from simpletuner.options.quantization_rules import gguf_sources, preset_of

    if config.quantize_via == "pipeline" and preset_of(config.base_model_precision):
        raise ConfigError("`--fuse_qkv_projections` with `--quantize_via pipeline`: the projections are fused after "
                          "loading, and weights quantized while loading cannot be concatenated. Use `--quantize_via "
                          "cpu` or `accelerator` (they quantize after fusing)")
    sources = gguf_sources(config)
    if sources:
        raise ConfigError(f"`--fuse_qkv_projections`: the denoiser comes from a GGUF file ({sources[0]}) whose "
                          "quantized blocks cannot be concatenated; remove `--fuse_qkv_projections`")


def memory_warnings(config) -> list[str]:
    warnings = []
    if not accelerator_visible():
        moving = [name for name in DEVICE_MOVING if _on(config, name)]
        if moving:
            warnings.append(", ".join(f"`--{name}`" for name in moving) + " moves weights between the accelerator and "
                            "CPU memory; no GPU is visible on this machine, so it saves no memory here")
    path = config.pretrained_model_name_or_path
    if config.delete_model_after_load and path and Path(str(path)).exists():
        warnings.append(f"`--delete_model_after_load` only deletes files downloaded from the hub; {path} is a local "
                        "path and is never deleted")
    return warnings


MEMORY_RULES: tuple[Callable, ...] = (
    check_exclusive, check_checkpointing_backend, check_group_offload, check_block_swap, check_ramtorch,
    check_vae_options, check_memory_budget, check_qkv_fusion,
)
