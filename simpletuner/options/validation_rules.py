"""Rules for the validation-sampling options (schedule, seeds, guidance, sampler, prompt libraries).
Torch-free like every rule; the tables below are also what :mod:`simpletuner.validation.runner` uses,
so the config check and the sampler agree on what is possible."""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import FAMILIES, family_info
from simpletuner.options import ConfigError

def can(family: str | None, capability: str) -> bool:
    """Whether the family table says ``family``'s validation pipeline has ``capability`` (a field of
    :class:`~simpletuner.models.registry.ValidationCapabilities`, or ``video``)."""
    info = FAMILIES.get(family or "")
    if info is None:
        return False
    return info.video if capability == "video" else bool(getattr(info.validation, capability))


def families_that(capability: str) -> tuple[str, ...]:
    """The registered families with ``capability`` (see :func:`can`), for messages and the runner."""
    return tuple(name for name in FAMILIES if can(name, capability))


#: Snapshots of the family table at import, kept for callers that list them (the rules call :func:`can`).
GUIDANCE_RESCALE_FAMILIES = families_that("guidance_rescale")
EMBEDDED_GUIDANCE_FAMILIES = families_that("embedded_guidance")
SKIP_LAYER_GUIDANCE_FAMILIES = families_that("skip_layer_guidance")
PREVIEW_FAMILIES = families_that("step_preview")
VIDEO_FAMILIES = families_that("video")

#: ``--validation_noise_scheduler`` names -> diffusers class, for noise-prediction (DDPM) families ...
DDPM_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
#: ... and for flow-matching families.
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler"}
#: Schedulers that cannot step a given prediction type.
UNSUPPORTED_PREDICTION = {"euler-a": ("sample",)}
#: Pixel-space IF predicts a learned variance that only a DDPM step consumes.
PIXEL_SPACE_SCHEDULERS = ("ddpm",)


def scheduler_class_name(name: str, flow_matching: bool) -> str | None:
    return (FLOW_SCHEDULERS if flow_matching else DDPM_SCHEDULERS).get(name)


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def check_validation_schedule(config) -> None:
    interval = config.validation_epoch_interval
    if interval is not None and interval < 1:
        raise ConfigError(f"`--validation_epoch_interval` = {interval} must be at least 1 (leave it unset to "
                          "validate by steps only)")
    if interval is not None and config.validation_disable:
        raise ConfigError("`--validation_disable` and `--validation_epoch_interval` conflict: remove one of them")
    if config.validation_on_startup and config.validation_disable:
        raise ConfigError("`--validation_disable` and `--validation_on_startup` conflict: remove one of them")


def check_validation_seeds(config) -> None:
    if config.validation_randomize and config.validation_seed is not None:
        raise ConfigError(f"`--validation_randomize` picks a new seed at every validation, so `--validation_seed "
                          f"{config.validation_seed}` would be ignored; remove one of them")


def check_validation_guidance(config) -> None:
    family = config.model_family
    rescale = config.validation_guidance_rescale
    if rescale is not None:
        if not can(family, "guidance_rescale"):
            raise ConfigError(f"`--validation_guidance_rescale {rescale}`: the {family} pipeline has no guidance "
                              f"rescale; it works for {', '.join(families_that('guidance_rescale'))}. Remove it")
        if not 0 <= rescale <= 1:
            raise ConfigError(f"`--validation_guidance_rescale` = {rescale} must be between 0 and 1 (0.7 is usual)")
    if not config.validation_disable_unconditional:
        return
    if rescale is not None:
        raise ConfigError(f"`--validation_guidance_rescale {rescale}` rescales classifier-free guidance, which "
                          "`--validation_disable_unconditional` turns off; remove one of them")
    if can(family, "embedded_guidance"):
        if config.validation_guidance_real is not None:
            raise ConfigError(f"`--validation_guidance_real {config.validation_guidance_real}` needs the unconditional "
                              "pass that `--validation_disable_unconditional` turns off; remove one of them")
    elif _set(config, "validation_guidance") and config.validation_guidance != 1.0:
        raise ConfigError(f"`--validation_guidance {config.validation_guidance}` needs the unconditional pass that "
                          "`--validation_disable_unconditional` turns off (it samples at guidance 1.0); remove one")


def check_validation_scheduler(config) -> None:
    name = config.validation_noise_scheduler
    if name is None:
        return
    info = family_info(config.model_family)
    prediction = config.prediction_type or info.prediction_types[0]
    flow = prediction == "flow_matching"
    table = FLOW_SCHEDULERS if flow else DDPM_SCHEDULERS
    allowed = tuple(table)
    if info.pixel_space:
        allowed = tuple(n for n in allowed if n in PIXEL_SPACE_SCHEDULERS)
    allowed = tuple(n for n in allowed if prediction not in UNSUPPORTED_PREDICTION.get(n, ()))
    if name not in allowed:
        kind = "a flow-matching" if flow else f"a {prediction}-prediction"
        raise ConfigError(f"`--validation_noise_scheduler {name}` cannot sample {kind} {info.name} model; "
                          f"choose one of: {', '.join(allowed)} (or leave it unset for the model's own scheduler)")


def check_prompt_libraries(config) -> None:
    if config.user_prompt_library:
        from simpletuner.validation.prompt_library import load_user_prompt_library

        try:
            load_user_prompt_library(config.user_prompt_library)
        except ValueError as error:
            raise ConfigError(f"`--user_prompt_library`: {error}") from None


def check_external_validation(config) -> None:
    """``--validation_method external-script`` needs a command that splits into arguments and names only
    placeholders the runner fills (validation/external.py)."""
    from simpletuner.validation.external import known_placeholders, placeholders_in, split_command

    script = config.validation_external_script
    external = config.validation_method == "external-script"
    if external and not script:
        raise ConfigError("`--validation_method external-script` needs `--validation_external_script`, the command to "
                          "run, e.g. \"/opt/tools/validate.sh {local_checkpoint_path} {global_step}\"")
    if not external:
        for name in ("validation_external_script", "validation_external_background"):
            if _set(config, name) and getattr(config, name):
                raise ConfigError(f"`--{name}` is only used with `--validation_method external-script`; add that or "
                                  f"remove `--{name}`")
        return
    try:
        argv = split_command(script)
        unknown = sorted(placeholders_in(argv) - known_placeholders(config))
    except ValueError as error:
        raise ConfigError(f"`--validation_external_script` {script!r}: {error} (quote arguments as in a shell; "
                          "use {{ and }} for literal braces)") from None
    if unknown:
        raise ConfigError(f"`--validation_external_script` {script!r} names unknown placeholder(s) "
                          f"{', '.join('{' + name + '}' for name in unknown)}; use local_checkpoint_path, global_step, "
                          "output_dir, tracker_run_name, tracker_project_name, model_family, model_type, lora_type, "
                          "huggingface_path, remote_checkpoint_path or any validation_* option")


def check_skip_layer_guidance(config) -> None:
    """Skip-layer guidance is a term of SD3's pipeline; its start / stop / scale mean nothing without
    the layer list, and it rides on the unconditional pass."""
    layers = config.validation_guidance_skip_layers
    tuning = [name for name in ("validation_guidance_skip_layers_start", "validation_guidance_skip_layers_stop",
                                "validation_guidance_skip_scale") if _set(config, name)]
    if layers is None:
        if tuning:
            raise ConfigError(f"`--{tuning[0]}` tunes skip-layer guidance, which `--validation_guidance_skip_layers` "
                              "turns on (e.g. [7, 8, 9]); add it or remove the tuning option")
        return
    family = config.model_family
    if not can(family, "skip_layer_guidance"):
        raise ConfigError(f"`--validation_guidance_skip_layers`: the {family} pipeline has no skip-layer guidance; it "
                          f"works for {', '.join(families_that('skip_layer_guidance'))}. Remove it")
    if not layers or not all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0
                             for layer in layers):
        raise ConfigError(f"`--validation_guidance_skip_layers` = {layers!r} must be a non-empty list of transformer "
                          "block indices (whole numbers from 0), e.g. [7, 8, 9]")
    start, stop = config.validation_guidance_skip_layers_start, config.validation_guidance_skip_layers_stop
    if start is not None and stop is not None and start >= stop:
        raise ConfigError(f"`--validation_guidance_skip_layers_start` {start} must be below "
                          f"`--validation_guidance_skip_layers_stop` {stop} (fractions of the sampling run)")
    if config.validation_disable_unconditional:
        raise ConfigError("`--validation_guidance_skip_layers` adds to classifier-free guidance, which "
                          "`--validation_disable_unconditional` turns off; remove one of them")


def check_validation_preview(config) -> None:
    if not config.validation_preview:
        if _set(config, "validation_preview_steps"):
            raise ConfigError("`--validation_preview_steps` sets how often `--validation_preview` decodes a preview; "
                              "add `--validation_preview` or remove it")
        return
    if config.validation_method == "external-script":
        raise ConfigError("`--validation_preview` shows the built-in sampler at work, which `--validation_method "
                          "external-script` replaces; remove one of them")
    family = config.model_family
    if not can(family, "step_preview"):
        raise ConfigError(f"`--validation_preview`: {family} has no Tiny AutoEncoder preview (its pipeline has no "
                          f"step callback or its latents no Tiny AutoEncoder); it works for "
                          f"{', '.join(families_that('step_preview'))}. Remove it")


def check_validation_adapters(config) -> None:
    """One source of extra adapters (a path or a config of runs), options that tune the one in use, and
    entries that parse; external validation samples nothing, so it takes no adapters."""
    from simpletuner.validation.adapters import runs_from_config

    path, runs = config.validation_adapter_path, config.validation_adapter_config
    if path and runs is not None:
        raise ConfigError("`--validation_adapter_path` and `--validation_adapter_config` both give validation adapters; "
                          "keep one (put the path into the config's runs to use both)")
    single = [name for name in ("validation_adapter_name", "validation_adapter_strength") if _set(config, name)]
    if single and not path:
        where = "with `--validation_adapter_config` (give it per entry there)" if runs is not None \
            else "without `--validation_adapter_path`"
        raise ConfigError(f"`--{single[0]}` has no effect {where}; remove it")
    if _set(config, "validation_adapter_mode") and not (path or runs is not None):
        raise ConfigError("`--validation_adapter_mode` has no effect without `--validation_adapter_path` or "
                          "`--validation_adapter_config`; add one or remove it")
    if not (path or runs is not None):
        return
    option = "validation_adapter_path" if path else "validation_adapter_config"
    if config.validation_method == "external-script":
        raise ConfigError(f"`--{option}` adds adapters to the built-in sampler, which `--validation_method "
                          "external-script` replaces; remove one of them")
    try:
        runs_from_config(config)
    except ValueError as error:
        raise ConfigError(f"`--{option}`: {error}") from None


def check_using_datasets(config) -> None:
    """Starting pictures need an img2img (image) or image-to-video (video) pipeline; the stitch side
    needs starting pictures in an image grid."""
    from simpletuner.validation.dataset_inputs import dataset_pictures

    family = config.model_family
    side = config.validation_stitch_input_location
    if not config.validation_using_datasets:
        if side:
            raise ConfigError(f"`--validation_stitch_input_location {side}` places the starting picture of "
                              "`--validation_using_datasets` beside each image; add that or remove it")
        return
    if not (can(family, "img2img") or can(family, "image_to_video")):
        starters = families_that("img2img") + families_that("image_to_video")
        raise ConfigError(f"`--validation_using_datasets`: {family} has no image-to-image or image-to-video pipeline; "
                          f"it works for {', '.join(starters)}. Remove it")
    if side and can(family, "image_to_video"):
        raise ConfigError(f"`--validation_stitch_input_location {side}`: {family} starts clips from the picture (it is "
                          "their first frame already); remove it")
    if config.validation_dataset_file:
        raise ConfigError("`--validation_using_datasets` and `--validation_dataset_file` both give starting pictures; "
                          "keep one")
    if config.validation_method == "external-script":
        raise ConfigError("`--validation_using_datasets` changes the built-in sampler, which `--validation_method "
                          "external-script` replaces; remove one of them")
    try:
        dataset_pictures(config)
    except ValueError as error:
        raise ConfigError(f"`--validation_using_datasets`: {error}") from None


def check_validation_compile(config) -> None:
    if config.validation_torch_compile and config.validation_method == "external-script":
        raise ConfigError("`--validation_torch_compile` compiles the built-in sampler, which `--validation_method "
                          "external-script` replaces; remove one of them")


def check_watermark(config) -> None:
    """The watermark needs its package, and marks still images only: video frames would lose it to the
    encoder's compression, so a video family is refused instead of silently shipping unmarked clips."""
    if not config.enable_watermark:
        return
    if can(config.model_family, "video"):
        raise ConfigError(f"`--enable_watermark` marks still images; {config.model_family} validates with videos, "
                          "whose compression would wipe the mark. Remove it")
    from simpletuner.validation.watermark import EXTRA, watermark_available

    if not watermark_available():
        raise ConfigError(f"`--enable_watermark` needs the invisible-watermark package, which is not installed: "
                          f"run `pip install '{EXTRA}'`, or remove the option")


def check_audio_only(config) -> None:
    if config.validation_audio_only:
        raise ConfigError(f"`--validation_audio_only`: {config.model_family} renders no audio, and no model family in "
                          "this trainer does; remove it")


def validation_option_warnings(config) -> list[str]:
    warnings = []
    if config.validation_disable_unconditional and not can(config.model_family, "embedded_guidance") \
            and _set(config, "validation_negative_prompt"):
        warnings.append("`--validation_negative_prompt` is only used by the unconditional pass, which "
                        "`--validation_disable_unconditional` turns off")
    if config.validation_epoch_interval and not (config.validation_prompt or config.validation_prompt_library
                                                 or config.user_prompt_library):
        warnings.append("`--validation_epoch_interval` is set but there is no validation prompt: "
                        "no validation images will be made")
    return warnings


VALIDATION_RULES: tuple[Callable, ...] = (
    check_validation_schedule, check_validation_seeds, check_validation_guidance, check_validation_scheduler,
    check_prompt_libraries, check_external_validation, check_skip_layer_guidance, check_validation_preview,
    check_audio_only, check_validation_adapters, check_using_datasets,
    check_validation_compile, check_watermark,
)
