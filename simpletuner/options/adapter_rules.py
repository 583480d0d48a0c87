"""Validation rules for adapter options: LoRA flavours, LyCORIS configs, initialisation, file formats.

Torch-free like every rule: a mistake surfaces before a model loads, naming both flags of a conflict.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

from simpletuner.options import ConfigError

#: Adapter options that mean nothing for ``--model_type full`` (rank/alpha/dropout are checked in
#: validation.check_conflicts).
ADAPTER_OPTIONS = ("lora_type", "lora_init_type", "lora_format", "peft_lora_mode", "peft_lora_target_modules",
                   "singlora_ramp_up_steps", "slider_lora_target", "init_lora", "lycoris_config", "init_lokr_norm",
                   "use_dora", "validation_lycoris_strength")
#: Options of PEFT LoRA that a LyCORIS run has its own keys for (or no use for).
PEFT_ONLY = {"lora_rank": "linear_dim", "lora_alpha": "linear_alpha", "lora_dropout": "dropout",
             "use_dora": "dora_wd", "lora_init_type": None, "peft_lora_mode": None, "peft_lora_target_modules":
             "apply_preset", "singlora_ramp_up_steps": None, "slider_lora_target": "apply_preset"}

LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "full", "ia3")
#: Keys ``--lycoris_config`` may hold: create_lycoris' keyword arguments, plus ours
#: (multiplier, linear_dim, linear_alpha, apply_preset).
LYCORIS_KEYS = ("algo", "multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "dropout", "rank_dropout",
                "module_dropout", "use_tucker", "use_scalar", "block_size", "train_norm", "constraint", "rescaled",
                "dora_wd", "wd_on_output", "full_matrix", "bypass_mode", "unbalanced_factorization", "decompose_both",
                "factor", "preset", "apply_preset")
#: ``apply_preset`` keys LyCORIS accepts; ``lora_prefix`` is left out so saved names stay ``lycoris_``.
LYCORIS_PRESET_KEYS = ("enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "use_fnmatch",
                       "unet_target_module", "unet_target_name", "text_encoder_target_module",
                       "text_encoder_target_name", "exclude_name")
#: Initialisations that rewrite the base weights they start from.
BASE_REWRITING_INITS = ("pissa", "olora", "loftq")


def _explicit(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) not in (None, False, "", [], {})


def _quantized(config) -> str | None:
    precision = config.base_model_precision
    return precision if precision not in (None, "no_change") else None


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process, judged without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def parse_target_modules(value: Any) -> list[str]:
    """``--peft_lora_target_modules``: a JSON list of module names, inline or in a file."""
    from simpletuner.options.values import read_json_option

    targets = read_json_option("peft_lora_target_modules", value)
    if isinstance(targets, str):  # a bare name or comma list is forgiven
        targets = [part.strip() for part in targets.split(",") if part.strip()]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"`--peft_lora_target_modules` must be a non-empty JSON list of module names "
                          f"(e.g. [\"to_q\", \"to_k\"]), got {targets!r}")
    return targets


def parse_lycoris_config(value: Any) -> dict[str, Any]:
    """``--lycoris_config``: checked keys, algorithm and preset, before lycoris is imported."""
    from simpletuner.options.values import read_json_option

    settings = read_json_option("lycoris_config", value)
    if not isinstance(settings, dict):
        raise ConfigError(f"`--lycoris_config` must be a JSON object such as {{\"algo\": \"lokr\", \"linear_dim\": 16}}, "
                          f"got {settings!r}")
    for key in settings:
        if key not in LYCORIS_KEYS:
            near = difflib.get_close_matches(key, LYCORIS_KEYS, n=1)
            raise ConfigError(f"`--lycoris_config`: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                              f"; known keys: {', '.join(LYCORIS_KEYS)}"))
    algo = str(settings.get("algo", "lora")).lower()
    if algo not in LYCORIS_ALGOS:
        raise ConfigError(f"`--lycoris_config`: algo {algo!r} is not supported; use one of {', '.join(LYCORIS_ALGOS)}")
    for key in ("linear_dim", "conv_dim"):
        if key in settings and (not isinstance(settings[key], int) or isinstance(settings[key], bool)
                                or settings[key] < 1):
            raise ConfigError(f"`--lycoris_config`: {key} = {settings[key]!r} must be a positive integer")
    for key in ("multiplier", "linear_alpha", "conv_alpha", "dropout", "rank_dropout", "module_dropout"):
        if key in settings and not isinstance(settings[key], (int, float)):
            raise ConfigError(f"`--lycoris_config`: {key} = {settings[key]!r} must be a number")
    preset = settings.get("apply_preset")
    if preset is not None:
        if not isinstance(preset, dict):
            raise ConfigError(f"`--lycoris_config`: apply_preset must be an object, got {preset!r}")
        for key in preset:
            if key not in LYCORIS_PRESET_KEYS:
                raise ConfigError(f"`--lycoris_config`: apply_preset key {key!r} is not supported; use "
                                  f"{', '.join(LYCORIS_PRESET_KEYS)}")
    return settings


def check_adapter_type(config) -> None:
    """Adapter options only with LoRA runs; LyCORIS and PEFT options each with their own type."""
    if config.model_type != "lora":
        changed = [name for name in ADAPTER_OPTIONS if _explicit(config, name)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` only applies to `--model_type lora`, but `--model_type "
                              f"{config.model_type}` is set; remove one of them")
        return
    if config.lora_type == "lycoris":
        if not config.lycoris_config:
            raise ConfigError("`--lora_type lycoris` needs `--lycoris_config` (a JSON file or inline JSON such as "
                              "{\"algo\": \"lokr\", \"linear_dim\": 16, \"linear_alpha\": 1})")
        for name, replacement in PEFT_ONLY.items():
            if _explicit(config, name):
                hint = f"set {replacement!r} in `--lycoris_config` instead" if replacement else "remove it"
                raise ConfigError(f"`--{name}` applies to PEFT LoRA, not to `--lora_type lycoris`; {hint}")
        settings = parse_lycoris_config(config.lycoris_config)
        if config.train_text_encoder:
            raise ConfigError("`--train_text_encoder` is not available with `--lora_type lycoris`: the LyCORIS network "
                              "covers the denoiser only; use `--lora_type standard` or remove `--train_text_encoder`")
        if config.init_lokr_norm is not None:
            if str(settings.get("algo", "lora")).lower() != "lokr":
                raise ConfigError(f"`--init_lokr_norm` initialises LoKr layers, but `--lycoris_config` uses algo "
                                  f"{settings.get('algo', 'lora')!r}; set \"algo\": \"lokr\" or remove `--init_lokr_norm`")
            if config.init_lokr_norm <= 0:
                raise ConfigError(f"`--init_lokr_norm` = {config.init_lokr_norm} must be positive (e.g. 1e-3)")
        return
    for name in ("lycoris_config", "init_lokr_norm", "validation_lycoris_strength"):
        if _explicit(config, name):
            raise ConfigError(f"`--{name}` only applies to `--lora_type lycoris`, but `--lora_type {config.lora_type}` "
                              "is set; add `--lora_type lycoris` or remove it")


def check_peft_options(config) -> None:
    """DoRA, initialisations, SingLoRA, targets: combinations PEFT (or our files) cannot honour."""
    if config.model_type != "lora" or config.lora_type == "lycoris":
        return
    init = config.lora_init_type
    if config.peft_lora_target_modules is not None:
        parse_target_modules(config.peft_lora_target_modules)
        if config.slider_lora_target:
            raise ConfigError("`--peft_lora_target_modules` and `--slider_lora_target` both choose the LoRA targets; "
                              "remove one of them")
    if init in BASE_REWRITING_INITS:
        quantized = _quantized(config)
        if quantized:
            raise ConfigError(f"`--lora_init_type {init}` rewrites the base weights it starts from, which a quantized "
                              f"base (`--base_model_precision {quantized}`) cannot hold; use `--lora_init_type default` "
                              "or gaussian, or `--base_model_precision no_change`")
        if config.use_dora:
            raise ConfigError(f"`--lora_init_type {init}` and `--use_dora` conflict: the DoRA magnitude would be "
                              "measured on the residual weight; remove one of them")
        if config.init_lora:
            raise ConfigError(f"`--init_lora` and `--lora_init_type {init}` both decide the adapter's starting "
                              "weights; remove one of them")
        if config.slider_lora_target:
            raise ConfigError(f"`--lora_init_type {init}` initialises Linear layers only, and `--slider_lora_target` "
                              "includes convolutions; remove one of them")
    if init == "loftq":
        if not cuda_visible():
            raise ConfigError("`--lora_init_type loftq` quantizes the base weights with bitsandbytes on an NVIDIA GPU "
                              "(PEFT's LoftQ runs on CUDA only), and no GPU is visible on this machine; use `pissa` "
                              "or `olora` for a data-free SVD/QR initialisation instead")
        for package in ("bitsandbytes", "scipy"):
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"`--lora_init_type loftq` needs the {package} package; pip install {package}")
    if config.peft_lora_mode == "singlora":
        if config.use_dora:
            raise ConfigError("`--peft_lora_mode singlora` and `--use_dora` conflict: SingLoRA has no DoRA variant; "
                              "remove one of them")
        if init in BASE_REWRITING_INITS:
            raise ConfigError(f"`--peft_lora_mode singlora` and `--lora_init_type {init}` conflict: SingLoRA starts "
                              "from a random A with a ramp (`default` or `gaussian` only)")
        if config.init_lora:
            raise ConfigError("`--init_lora` and `--peft_lora_mode singlora` conflict: a saved LoRA's two factors "
                              "cannot seed SingLoRA's single symmetric matrix; remove one of them")
        if config.singlora_ramp_up_steps is not None and config.singlora_ramp_up_steps < 1:
            raise ConfigError(f"`--singlora_ramp_up_steps` = {config.singlora_ramp_up_steps} must be at least 1: the "
                              "ramp is what starts SingLoRA from the base model")
    elif config.singlora_ramp_up_steps is not None:
        raise ConfigError("`--singlora_ramp_up_steps` only applies with `--peft_lora_mode singlora`; add it or remove "
                          "`--singlora_ramp_up_steps`")


def check_lora_files(config) -> None:
    """``--lora_format`` must have a layout for the family; ``--init_lora`` must be an adapter file of the
    kind this run trains."""
    if config.model_type != "lora":
        return
    from simpletuner.models.lora_formats import LoraFormatError, comfyui_naming, detect_format, read_safetensors_header
    from simpletuner.models.registry import families_where, family_info

    if config.lora_format == "comfyui":
        naming = comfyui_naming(config.model_family)
        if naming is None:
            reason = family_info(config.model_family).comfy_refusal
            if reason:
                raise ConfigError(f"`--lora_format comfyui` is not available for `--model_family "
                                  f"{config.model_family}`: {reason}; use `--lora_format diffusers` (the layout its "
                                  "diffusers pipeline loads)")
            declared = sorted(families_where(lambda info: info.comfy_naming is not None))
            raise ConfigError(f"`--lora_format comfyui` has no key layout declared for `--model_family "
                              f"{config.model_family}` yet (declared: {', '.join(declared)}); use "
                              "`--lora_format diffusers`")
        if config.use_dora:
            raise ConfigError("`--lora_format comfyui` and `--use_dora` conflict: ComfyUI normalises DoRA magnitudes "
                              "differently from PEFT, so the file would not reproduce the trained model; use "
                              "`--lora_format diffusers` or remove `--use_dora`")
        if config.lora_type == "lycoris" and naming.style != "kohya":
            raise ConfigError(f"`--lora_format comfyui` with `--lora_type lycoris` needs kohya-style names, which "
                              f"{config.model_family} does not use; use `--lora_format diffusers` (LyCORIS' own names)")
    if config.init_lora:
        path = Path(config.init_lora).expanduser()
        if not path.is_file():
            raise ConfigError(f"`--init_lora`: {config.init_lora!r} is not a file")
        try:
            keys, metadata = read_safetensors_header(path)
        except LoraFormatError as error:
            raise ConfigError(f"`--init_lora`: {error}") from None
        layout = detect_format(keys, metadata)
        if layout == "lycoris" and config.lora_type != "lycoris":
            raise ConfigError(f"`--init_lora` {path.name} is a LyCORIS file, but `--lora_type {config.lora_type}` is "
                              "set; use `--lora_type lycoris` with a matching `--lycoris_config`")
        if layout == "diffusers" and config.lora_type == "lycoris":
            raise ConfigError(f"`--init_lora` {path.name} is a PEFT/diffusers LoRA, but `--lora_type lycoris` is set; "
                              "use `--lora_type standard`")


def check_validation_strength(config) -> None:
    strength = config.validation_lycoris_strength
    if strength is not None and strength < 0:
        raise ConfigError(f"`--validation_lycoris_strength` = {strength} must not be negative (1.0 is full strength)")


ADAPTER_RULES: tuple[Callable, ...] = (check_adapter_type, check_peft_options, check_lora_files,
                                       check_validation_strength)
