"""Validation rules for DeepSpeed ZeRO (``--zero_stage``, ``--deepspeed_config``). Torch-free.

The combinations refused here cannot work rather than merely being slow: DeepSpeed's engine takes
ownership of the denoiser's parameters when the model is prepared (it moves them to the GPU, casts
them to the training precision and, from stage 3 on, replaces each weight by a slice of it), so any
feature that keeps its own hands on those parameters would fight it. The deepspeed package is checked
last, so a config is told about every other problem on a machine without it too.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.options import ConfigError

#: Options that manage where the denoiser's weights live, which DeepSpeed's engine decides instead.
WEIGHT_PLACEMENT = {
    "musubi_blocks_to_swap": "block swap moves the denoiser's blocks between CPU and GPU with its own hooks",
    "ramtorch": "RamTorch keeps the denoiser's frozen weights in CPU memory and streams them in",
    "enable_group_offload": "group offload moves groups of layers on and off the GPU with its own hooks",
}
#: What ``--base_model_precision`` values mean "not quantized".
UNQUANTIZED = (None, "", "no_change")


def _uses_deepspeed(config) -> bool:
    from simpletuner.training.deepspeed import uses_deepspeed

    return uses_deepspeed(config)


def _stage(config) -> int:
    from simpletuner.training.deepspeed import DeepSpeedConfigError, zero_stage_of

    try:
        return zero_stage_of(config)
    except DeepSpeedConfigError as error:
        raise ConfigError(str(error)) from None


def check_deepspeed_config(config) -> None:
    """The DeepSpeed config parses, has a ZeRO section, and agrees with the options it overlaps."""
    if not _uses_deepspeed(config):
        return
    from simpletuner.training.deepspeed import DeepSpeedConfigError, deepspeed_config_for, user_deepspeed_config

    try:
        given = user_deepspeed_config(config)
        if given and "zero_optimization" not in given:
            raise DeepSpeedConfigError("`--deepspeed_config` has no zero_optimization section; add one (e.g. "
                                       "{\"zero_optimization\": {\"stage\": 2}}) or use `--zero_stage` alone")
        deepspeed_config_for(config)
    except DeepSpeedConfigError as error:
        raise ConfigError(str(error)) from None


def check_deepspeed_weight_placement(config) -> None:
    if not _uses_deepspeed(config):
        return
    for name, what in WEIGHT_PLACEMENT.items():
        if getattr(config, name):
            raise ConfigError(f"`--{name}` cannot be combined with DeepSpeed ZeRO (`--zero_stage` / "
                              f"`--deepspeed_config`): {what}, while DeepSpeed's engine owns the parameters. Remove "
                              f"`--{name}`; ZeRO's own offload_param / offload_optimizer (in `--deepspeed_config`) "
                              "saves the memory instead")


def check_deepspeed_quantized_base(config) -> None:
    if _uses_deepspeed(config) and config.base_model_precision not in UNQUANTIZED:
        raise ConfigError(
            f"`--base_model_precision {config.base_model_precision}` cannot be combined with DeepSpeed ZeRO: "
            "DeepSpeed casts every weight of the denoiser to the training precision and flattens them into its "
            "own buffers, which quantized weights do not survive. Use `--base_model_precision no_change`, or train "
            "the quantized model without `--zero_stage` / `--deepspeed_config`")


def check_deepspeed_training_parts(config) -> None:
    """Features that touch what ZeRO splits: EMA under stage 3, the text encoder, value clipping,
    schedule-free optimizers."""
    if not _uses_deepspeed(config):
        return
    stage = _stage(config)
    if config.use_ema and stage == 3:
        raise ConfigError("`--use_ema` cannot be combined with ZeRO stage 3: each process holds only a slice of "
                          "every weight, so there is no whole weight to average. Use `--zero_stage 2` (whole weights, "
                          "split optimizer state and gradients) or turn EMA off")
    if config.lora_type == "lycoris":
        raise ConfigError("`--lora_type lycoris` cannot be combined with DeepSpeed ZeRO: LyCORIS keeps its weights in its "
                          "own network beside the denoiser, outside the one model DeepSpeed's engine owns and splits. "
                          "Use `--lora_type standard`, or train LyCORIS without ZeRO")
    if config.train_text_encoder:
        raise ConfigError("`--train_text_encoder` cannot be combined with DeepSpeed ZeRO: accelerate gives one "
                          "DeepSpeed engine one model, and the text encoder would be a second one. Train the "
                          "denoiser only, or leave out `--zero_stage` / `--deepspeed_config`")
    if config.grad_clip_method == "value" and config.max_grad_norm:
        raise ConfigError("`--grad_clip_method value` cannot be combined with DeepSpeed ZeRO: DeepSpeed clips by "
                          "the norm of the whole gradient only. Use `--grad_clip_method norm`, or `--max_grad_norm 0` "
                          "for no clipping")
    if "schedulefree" in str(config.optimizer):
        raise ConfigError(f"`--optimizer {config.optimizer}` cannot be combined with DeepSpeed ZeRO: schedule-free "
                          "optimizers swap weights when switched between train and eval mode, and DeepSpeed's ZeRO "
                          "optimizer wrapper neither passes those switches on nor sees the swapped weights. Use "
                          "another optimizer (e.g. optimi-adamw)")


def check_deepspeed_installed(config) -> None:
    from simpletuner.training.deepspeed import INSTALL_HINT, deepspeed_installed

    if _uses_deepspeed(config) and not deepspeed_installed():
        given = "`--zero_stage`" if config.zero_stage is not None else "`--deepspeed_config`"
        raise ConfigError(f"{given} trains with DeepSpeed ZeRO, but the deepspeed package is not installed in this "
                          f"environment; install it with `{INSTALL_HINT}`, or remove the option to train without ZeRO")


def check_deepspeed_stage(config) -> None:
    """Stage 3 splits the weights themselves: every forward pass gathers them from all processes, so
    nothing can run the denoiser on the main process alone, which is how validation samples."""
    if not (_uses_deepspeed(config) and _stage(config) == 3):
        return
    if config.validation_prompt and not config.validation_disable:
        given = "`--zero_stage 3`" if config.zero_stage is not None else "stage 3 in `--deepspeed_config`"
        raise ConfigError(f"`--validation_prompt` cannot be combined with {given} yet: validation samples on the main "
                          "process alone, and every forward pass of a ZeRO-3 model needs all processes to gather the "
                          "weights. Set `--validation_disable true` and validate the saved LoRA / pipeline after "
                          "training, or use `--zero_stage 2`")


def check_deepspeed_step_control(config) -> None:
    """DeepSpeed's engine runs the optimizer step inside the backward of the last micro-batch, so the
    trainer cannot hold a step back or touch the gradients between backward and step."""
    if not _uses_deepspeed(config):
        return
    if config.nan_action == "skip_batch":
        raise ConfigError("`--nan_action skip_batch` cannot be combined with DeepSpeed ZeRO: DeepSpeed's engine applies "
                          "the optimizer step inside the backward pass, before the trainer could drop the batch. Use "
                          "`--nan_action stop` (the run stops on a non-finite loss and no checkpoint is written from "
                          "non-finite weights)")
    if config.gradient_precision == "fp32":
        raise ConfigError("`--gradient_precision fp32` cannot be combined with DeepSpeed ZeRO: DeepSpeed accumulates "
                          "and reduces the gradients in its own buffers. Set it in DeepSpeed's config instead: "
                          "`--deepspeed_config '{\"zero_optimization\": {\"stage\": 2}, \"data_types\": "
                          "{\"grad_accum_dtype\": \"fp32\"}}'`")


DEEPSPEED_RULES: tuple[Callable, ...] = (
    check_deepspeed_config, check_deepspeed_weight_placement, check_deepspeed_quantized_base,
    check_deepspeed_training_parts, check_deepspeed_step_control, check_deepspeed_stage, check_deepspeed_installed,
)
