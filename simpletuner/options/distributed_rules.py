"""Validation rules for FSDP2 and HSDP (``--fsdp_*``, ``--hsdp_*``). Torch-free.

Under FSDP2 each process holds only a slice of every denoiser weight (a DTensor shard) and gathers a
block's full weights just before the block runs, with all processes taking part. Everything that keeps
its own hands on the denoiser's weights, or runs the denoiser on one process alone, would either fight
the sharding or wait forever for the other processes; those combinations are refused here with the
reason, before any model loads.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.options import ConfigError

#: Options that only mean something with --fsdp_enable (their defaults are accepted without it).
FSDP_DETAILS = ("fsdp_version", "fsdp_reshard_after_forward", "fsdp_state_dict_type", "fsdp_cpu_ram_efficient_loading",
                "fsdp_transformer_layer_cls_to_wrap", "hsdp_replicate_dim", "hsdp_shard_dim")

#: option -> why it cannot run with the denoiser's weights sharded.
NOT_WITH_FSDP = {
    "musubi_blocks_to_swap": "block swap moves whole blocks between devices with its own hooks, while FSDP2 keeps "
                             "only a slice of each block on every process",
    "ramtorch": "RamTorch replaces the denoiser's linear layers by CPU-resident ones that FSDP2 cannot shard",
    "enable_group_offload": "group offload moves layers on and off the accelerator with its own hooks, which FSDP2's "
                            "gathering of each block's weights would undo",
    "use_ema": "the EMA copy would hold slices of the weights, and saving it needs the gathering that only the "
               "model itself gets so far",
    "train_text_encoder": "only the denoiser is sharded; the text encoder would need its own FSDP wrapping",
    "controlnet": "the ControlNet is trained beside a frozen denoiser, and simpletuner shards only the trained model",
    "zero_stage": "DeepSpeed ZeRO and FSDP are two different sharding engines; accelerate runs one of them",
    "deepspeed_config": "DeepSpeed ZeRO and FSDP are two different sharding engines; accelerate runs one of them",
}


def _on(config, name: str) -> bool:
    value = getattr(config, name)
    return value not in (None, False, 0, "", "none")


def _explicit(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def check_fsdp_details_need_fsdp(config) -> None:
    """A sharding detail without --fsdp_enable would be silently ignored: say so instead."""
    if config.fsdp_enable:
        return
    for name in FSDP_DETAILS:
        if _explicit(config, name):
            raise ConfigError(f"`--{name}` only applies when the weights are sharded; add `--fsdp_enable true` or "
                              f"remove `--{name}`")


def check_fsdp_settings(config) -> None:
    """The FSDP settings simpletuner can carry out (version 2, the usual loading)."""
    if not config.fsdp_enable:
        return
    if config.fsdp_version != 2:
        raise ConfigError(f"`--fsdp_version {config.fsdp_version}` is not supported: simpletuner shards with FSDP2 "
                          "(torch's fully_shard), whose weights stay ordinary parameters that LoRA, clipping and "
                          "saving handle alike; FSDP1 flattens them into buffers. Use `--fsdp_version 2`")
    if config.fsdp_cpu_ram_efficient_loading and config.lora_init_type in ("pissa", "olora", "loftq"):
        raise ConfigError(f"`--lora_init_type {config.lora_init_type}` cannot be combined with "
                          "`--fsdp_cpu_ram_efficient_loading true`: it computes the adapter's start from the base "
                          "weights (and rewrites them), which only the main process has read; the others build the "
                          "denoiser without weights. Leave `--lora_init_type` unset (or default / gaussian), or "
                          "load the weights in every process (`--fsdp_cpu_ram_efficient_loading false`)")
    if config.num_processes is not None and config.num_processes < 2:
        raise ConfigError(f"`--fsdp_enable` shards the weights across processes, but `--num_processes "
                          f"{config.num_processes}` starts one. Set `--num_processes 2` or more (TRAINING_NUM_PROCESSES "
                          "in config.env), or remove `--fsdp_enable`")


def check_fsdp_combinations(config) -> None:
    if not config.fsdp_enable:
        return
    for name, why in NOT_WITH_FSDP.items():
        if _on(config, name):
            raise ConfigError(f"`--{name}` cannot be combined with `--fsdp_enable`: {why}. Remove `--{name}` or "
                              "`--fsdp_enable`")
    if config.model_type == "lora" and config.lora_type == "lycoris":
        raise ConfigError("`--lora_type lycoris` cannot be combined with `--fsdp_enable`: LyCORIS keeps its weights in "
                          "its own network beside the denoiser, which FSDP2 does not shard or gather. Use "
                          "`--lora_type standard`")
    if config.base_model_precision not in (None, "", "no_change"):
        raise ConfigError(f"`--base_model_precision {config.base_model_precision}` cannot be combined with "
                          "`--fsdp_enable`: fully_shard splits every weight into DTensor slices, and the quantized "
                          "weight types do not support being sliced. Use `--base_model_precision no_change`")
    if config.gradient_precision == "fp32":
        raise ConfigError("`--gradient_precision fp32` cannot be combined with `--fsdp_enable`: its fp32 gradient "
                          "copies would hold whole weights while FSDP2 reduces each gradient to a slice. Remove it; "
                          "FSDP2 already reduces gradients in the weights' precision")
    if config.validation_prompt and not config.validation_disable:
        raise ConfigError("`--validation_prompt` cannot be combined with `--fsdp_enable` yet: validation samples on "
                          "the main process alone, and every forward pass of a sharded model needs all processes "
                          "to gather the weights. Set `--validation_disable true`, or validate the saved LoRA / "
                          "pipeline after training")


def check_hsdp_mesh(config) -> None:
    """HSDP: both mesh dims, and their product is the process count (when the config knows it)."""
    replicate, shard = config.hsdp_replicate_dim, config.hsdp_shard_dim
    if replicate is None and shard is None:
        return
    if replicate is None or shard is None:
        given, missing = ("hsdp_replicate_dim", "hsdp_shard_dim") if shard is None else ("hsdp_shard_dim",
                                                                                          "hsdp_replicate_dim")
        raise ConfigError(f"`--{given}` needs `--{missing}` too: the device mesh of HSDP has both dimensions "
                          "(replicas x processes per replica)")
    if config.num_processes is not None and replicate * shard != config.num_processes:
        raise ConfigError(f"`--hsdp_replicate_dim {replicate}` x `--hsdp_shard_dim {shard}` = {replicate * shard} "
                          f"processes, but `--num_processes` is {config.num_processes}; make the product equal the "
                          "process count")


DISTRIBUTED_RULES: tuple[Callable, ...] = (
    check_fsdp_details_need_fsdp, check_fsdp_settings, check_fsdp_combinations, check_hsdp_mesh,
)
