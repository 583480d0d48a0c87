"""Validation rules for sequence parallel (``--sp_size``) and tensor parallel (``--tp_size``). Torch-free.

With ``--sp_size N`` the processes form groups of N that train one batch together: each holds a slice of
every clip's tokens and diffusers' context-parallel hooks exchange the slices around attention
(simpletuner/training/sequence_parallel.py). Anything that looks at the tokens between the split and
the gather would see only a slice, and anything that runs the denoiser on one process alone would wait
forever for the rest of its group; those combinations are refused here with the reason, before any
model loads.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import FAMILIES, family_info
from simpletuner.options import ConfigError

#: ``--attention_mechanism`` values whose diffusers backend has a context-parallel form
#: (``supports_context_parallel=True`` in diffusers' attention dispatcher; "diffusers" is its native SDPA
#: backend). tests/training/test_sequence_parallel.py checks this list against diffusers' registry.
SEQUENCE_PARALLEL_ATTENTION = ("diffusers", "flash-attn", "flash-attn-2", "cudnn", "native-flash", "native-npu")

#: option -> why it cannot run while each process holds only a slice of the tokens.
NOT_WITH_SEQUENCE_PARALLEL = {
    "tread_config": "TREAD drops tokens inside the blocks, and each process would choose them from its own slice, "
                    "leaving the slices of one group with different lengths for the attention exchange",
    "crepa_enabled": "CREPA's hook reads one block's hidden states, which hold only this process's slice of the tokens",
    "layersync_enabled": "LayerSync's hooks compare two blocks' hidden states, which hold only this process's slice "
                         "of the tokens",
    "musubi_blocks_to_swap": "block swap has not been tested with the context-parallel hooks on the same blocks",
    "enable_group_offload": "group offload has not been tested with the context-parallel hooks on the same blocks",
    "ramtorch": "RamTorch's CPU-resident layers have not been tested with the context-parallel hooks",
    "fsdp_enable": "FSDP2 sharding has not been tested together with the context-parallel hooks yet; sequence "
                   "parallel runs under DDP",
    "zero_stage": "DeepSpeed's engine has not been tested with the context-parallel hooks; sequence parallel runs "
                  "under DDP",
    "deepspeed_config": "DeepSpeed's engine has not been tested with the context-parallel hooks; sequence parallel "
                        "runs under DDP",
}


def _on(config, name: str) -> bool:
    value = getattr(config, name)
    return value not in (None, False, 0, "", "none")


def check_tensor_parallel(config) -> None:
    """``--tp_size`` above 1 is refused: there is no sound training path for it yet."""
    if config.tp_size in (None, 1):
        return
    raise ConfigError(f"`--tp_size {config.tp_size}` is not supported: diffusers' tensor parallelism has no plan for "
                      "the video families' transformers (only Flux, Flux 2 and Qwen-Image have one), it runs only on "
                      "GPUs (no CPU/gloo path to test training on), and it shards the linear layers LoRA wraps. Use "
                      "`--sp_size` to split long clips across GPUs, or remove `--tp_size`")


def check_sequence_parallel_family(config) -> None:
    """Only families whose FamilyInfo says ``sequence_parallel`` can split their tokens."""
    if config.sp_size in (None, 1) or config.model_family not in FAMILIES:
        return
    if not family_info(config.model_family).sequence_parallel:
        able = ", ".join(name for name in FAMILIES if family_info(name).sequence_parallel)
        raise ConfigError(f"`--sp_size {config.sp_size}` is not available for `--model_family {config.model_family}`: "
                          f"sequence parallel works for {able}, whose denoiser diffusers can split along the sequence "
                          "for training. Remove `--sp_size` or set it to 1")


def check_sequence_parallel_experts(config) -> None:
    """Both experts of a two-expert Wan 2.2 model in one run are refused (one expert per run works)."""
    if config.sp_size in (None, 1) or config.model_family not in FAMILIES or config.refiner_training:
        return
    if config.model_flavour in family_info(config.model_family).expert_flavours:
        raise ConfigError(f"`--sp_size` cannot train both experts of `--model_flavour {config.model_flavour}` in one "
                          "run yet: each sample goes to one expert, and with several processes the processes' "
                          "weights drift apart (seen with plain data parallel too). Train one expert per run with "
                          "`--refiner_training` (and `--refiner_training_invert_schedule` for the high-noise one)")


def check_sequence_parallel_processes(config) -> None:
    """num_processes must be a whole number of groups. Checked here when the config sets the count; a count
    from config.env (TRAINING_NUM_PROCESSES) is checked by the trainer at start-up with the same words."""
    size, processes = config.sp_size, config.num_processes
    if size in (None, 1) or processes is None:
        return
    if processes % size:
        raise ConfigError(f"`--sp_size {size}` needs `--num_processes` to be a multiple of {size} (each group of {size} "
                          f"processes trains one batch together), but it is {processes}. Set `--num_processes "
                          f"{max(size, processes - processes % size)}` (TRAINING_NUM_PROCESSES in config.env) or a "
                          f"smaller `--sp_size`")


def check_sequence_parallel_combinations(config) -> None:
    if config.sp_size in (None, 1):
        return
    for name, why in NOT_WITH_SEQUENCE_PARALLEL.items():
        if _on(config, name):
            raise ConfigError(f"`--{name}` cannot be combined with `--sp_size {config.sp_size}`: {why}. Remove "
                              f"`--{name}` or `--sp_size`")
    if config.attention_mechanism not in SEQUENCE_PARALLEL_ATTENTION:
        raise ConfigError(f"`--attention_mechanism {config.attention_mechanism}` cannot be combined with `--sp_size`: "
                          "its diffusers backend has no context-parallel form. Use one of "
                          f"{', '.join(SEQUENCE_PARALLEL_ATTENTION)}")
    if config.validation_prompt and not config.validation_disable:
        raise ConfigError("`--validation_prompt` cannot be combined with `--sp_size` yet: validation samples on the main "
                          "process alone, and every forward pass of the split denoiser needs its whole group. Set "
                          "`--validation_disable true`, or validate the saved LoRA / pipeline after training")
    if config.eval_steps_interval or config.eval_epoch_interval:
        raise ConfigError("`--eval_steps_interval` / `--eval_epoch_interval` cannot be combined with `--sp_size` yet: "
                          "the eval loss gives each process different eval batches, while the processes of one group "
                          "must run the denoiser on the same batch. Remove the eval interval")


SEQUENCE_PARALLEL_RULES: tuple[Callable, ...] = (
    check_tensor_parallel, check_sequence_parallel_family, check_sequence_parallel_experts,
    check_sequence_parallel_processes,
    check_sequence_parallel_combinations,
)
