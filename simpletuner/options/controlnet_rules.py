"""Rules for ``--controlnet`` and its options, and the refusals of ``--control`` and ``--ramtorch_controlnet``.

Torch-free like every rule: a ControlNet run that cannot work stops before a model loads. Which
families can train a ControlNet is a family fact (``FamilyInfo.controlnet_class`` in
simpletuner/models/registry.py); the dataset side (every trained dataset paired with a control
image) is checked with the dataset plan, by :func:`check_controlnet_datasets`.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import FAMILIES, family_info
from simpletuner.options import ConfigError

#: Options that only mean something with ``--controlnet``.
CONTROLNET_OPTIONS = ("controlnet_model_name_or_path", "controlnet_custom_config")


def controlnet_families() -> list[str]:
    """The families that can train a ControlNet, in catalogue order."""
    return [info.name for info in FAMILIES.values() if info.supports_controlnet]


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) not in (None, "", {}, False)


def control_families() -> list[str]:
    """The families whose denoiser can take the control image in its input channels (``--control``)."""
    return [info.name for info in FAMILIES.values() if info.channel_control]


def check_control(config) -> None:
    """Channel-concatenated control (Flux Control): a family that supports it, full training, and not
    together with a ControlNet."""
    if not config.control:
        return
    info = family_info(config.model_family)
    if not info.channel_control:
        raise ConfigError(f"`--control` (control latents concatenated to the denoiser's input channels) is not "
                          f"available for {info.name}; it is for: {', '.join(control_families())}. Train a "
                          f"ControlNet instead with `--controlnet` (families: {', '.join(controlnet_families())})")
    if config.controlnet:
        raise ConfigError("`--control` and `--controlnet` are two ways to feed the control image; choose one")
    if config.model_type != "full":
        raise ConfigError(f"`--control` with `--model_type {config.model_type}`: the widened input layer's new "
                          "weights must train, which a LoRA on it does not save in a form FluxControlPipeline loads "
                          "here yet; set `--model_type full`")
    for name in ("validation_guidance_real", "validation_negative_prompt"):
        if name in config.explicit and getattr(config, name):
            raise ConfigError(f"`--control` validates with diffusers' FluxControlPipeline, which takes no negative "
                              f"prompt and has no real CFG; remove `--{name}`")


def check_ramtorch_controlnet(config) -> None:
    """RamTorch streams frozen weights; a trained ControlNet has none."""
    if config.ramtorch_controlnet:
        raise ConfigError("`--ramtorch_controlnet` cannot work: RamTorch keeps only frozen weights in CPU memory "
                          "(trained tensors stay on the accelerator), and every weight of the ControlNet trains. "
                          "Remove it; `--ramtorch` still streams the frozen base model's layers")


def check_controlnet_options_need_controlnet(config) -> None:
    if config.controlnet:
        return
    changed = [name for name in CONTROLNET_OPTIONS if _set(config, name)]
    if changed:
        raise ConfigError(f"`--{changed[0]}` only applies to ControlNet training; set `--controlnet true` or remove it")


def check_controlnet_family(config) -> None:
    if not config.controlnet:
        return
    info = family_info(config.model_family)
    if not info.supports_controlnet:
        raise ConfigError(f"`--controlnet` is not available for {info.name}; the families that can train a ControlNet "
                          f"are: {', '.join(controlnet_families())}")
    if "refiner" in (config.model_flavour or ""):
        raise ConfigError(f"`--controlnet` with `--model_flavour {config.model_flavour}`: diffusers has no ControlNet "
                          "pipeline for the SDXL refiner; train the ControlNet on the base model")


def check_controlnet_training(config) -> None:
    """What a ControlNet run trains and how: all of the ControlNet, nothing else."""
    if not config.controlnet:
        return
    if config.model_type != "full":
        raise ConfigError(f"`--controlnet` with `--model_type {config.model_type}`: a LoRA on the ControlNet is not "
                          "available; set `--model_type full`, which trains the whole ControlNet while the base "
                          "model stays frozen")
    conflicts = [
        ("use_ema", "EMA averages the base model's trained weights, and with `--controlnet` the ControlNet trains"),
        ("train_text_encoder", "the text encoders stay frozen while a ControlNet trains"),
        ("fuse_qkv_projections", "a new ControlNet copies the base model's separate q/k/v weights"),
        ("tread_config", "TREAD drops tokens inside the base model, where the ControlNet's residuals are added to "
                         "every token"),
        ("scheduled_sampling_max_step_offset", "the scheduled-sampling rollout calls the base model without the "
                                               "ControlNet"),
    ]
    for name, reason in conflicts:
        if getattr(config, name):
            raise ConfigError(f"`--controlnet` and `--{name}` cannot be combined: {reason}; remove `--{name}`")
    if config.training_method != "sft":
        raise ConfigError(f"`--controlnet` trains with the standard denoising loss, but `--training_method "
                          f"{config.training_method}` is set; remove `--training_method`")
    if (config.num_processes or 1) > 1:
        raise ConfigError(f"`--controlnet` trains on one process for now, but `--num_processes {config.num_processes}` "
                          "is set; use one process")


def check_control_validation(config) -> None:
    """Validation of a control run samples from text and the control image, not from dataset pictures."""
    if (config.controlnet or config.control) and config.validation_using_datasets:
        flag = "--controlnet" if config.controlnet else "--control"
        raise ConfigError(f"`{flag}` validates with the family's control pipeline and the first control image, "
                          "which has no img2img form; remove `--validation_using_datasets`")


def check_controlnet_source(config) -> None:
    """A new ControlNet is built from the base weights, so its config overrides need that path."""
    if not config.controlnet:
        return
    custom = config.controlnet_custom_config
    if custom and config.controlnet_model_name_or_path:
        raise ConfigError("`--controlnet_custom_config` shapes a new ControlNet, but `--controlnet_model_name_or_path` "
                          "loads an existing one with its own config; remove one of them")
    if isinstance(custom, str):
        raise ConfigError(f"`--controlnet_custom_config` {custom!r} is neither inline JSON nor an existing JSON file; "
                          "give e.g. '{\"num_layers\": 6}'")
    if custom is not None and not isinstance(custom, dict):
        raise ConfigError("`--controlnet_custom_config` must be a JSON object of config settings, e.g. "
                          "'{\"num_layers\": 6}'")
    quantized = config.base_model_precision not in (None, "no_change")
    if quantized and not config.controlnet_model_name_or_path:
        raise ConfigError(f"`--controlnet` with `--base_model_precision {config.base_model_precision}`: a new "
                          "ControlNet is initialised from the base model's weights, which would then be quantized; start from "
                          "an existing ControlNet (`--controlnet_model_name_or_path`) or leave the base unquantized")


def check_controlnet_datasets(config, plan) -> None:
    """With ``--controlnet`` or ``--control``, every dataset that trains (or is evaluated) pairs a
    ``controlnet`` conditioning dataset, so every batch carries a control image. Called with the
    dataset plan (data/settings.py)."""
    if not (config.controlnet or config.control):
        return
    from simpletuner.data.config import DatasetConfigError

    flag = "--controlnet" if config.controlnet else "--control"
    conditioning = plan.conditioning
    for cfg in (*plan.enabled_images, *plan.eval_datasets):
        types = [conditioning[name].conditioning_type for name in cfg.conditioning_data if name in conditioning]
        if "controlnet" not in types:
            raise DatasetConfigError(
                f"dataset {cfg.id!r}: `{flag}` needs a control image for every training image, and this dataset "
                "pairs no conditioning dataset of \"conditioning_type\": \"controlnet\"; add \"conditioning_data\": "
                "[\"<id of a conditioning dataset>\"] to it (see documentation/CONTROLNET.md) or disable it")


CONTROLNET_RULES: tuple[Callable, ...] = (
    check_control, check_ramtorch_controlnet, check_controlnet_options_need_controlnet, check_controlnet_family,
    check_controlnet_training, check_controlnet_source, check_control_validation,
)
