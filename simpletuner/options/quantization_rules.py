"""Validation rules for quantized base models: presets, where they run, pipeline configs, GGUF files.

Torch-free like every rule. What a preset needs (a package, a GPU, a kernel) is probed cheaply here
(``importlib.util.find_spec``, the NVIDIA driver's files), so a combination that cannot run on this
machine stops before a model loads, with the reason and a preset that would work. torch is imported
only to read a GPU's compute capability, and only when an fp8 activation kernel asks for one.

The presets themselves are declared once, in :data:`PRESETS`; simpletuner/models/quantize.py acts
on them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simpletuner.options import ConfigError
from simpletuner.options.adapter_rules import cuda_visible


@dataclass(frozen=True)
class Preset:
    """One ``--base_model_precision`` / ``--text_encoder_N_precision`` value.

    Attributes:
        backend: ``quanto`` (optimum-quanto), ``torchao`` or ``bnb`` (bitsandbytes).
        weights: the backend's name for the weight type (a quanto qtype, a torchao kind, a bnb quant type).
        bits: bits per quantized weight, for messages and the memory planner.
        package: the module ``importlib`` must find.
        conv_weights: the optimum-quanto weight type the preset's ``nn.Conv2d`` layers get, for a
            backend that quantizes Linear layers only (torchao has no quantized convolution,
            bitsandbytes no 4-bit one); None where the backend quantizes convolutions itself (quanto).
    """

    backend: str
    weights: str
    bits: int
    package: str
    conv_weights: str | None = None


PRESETS: dict[str, Preset] = {
    "int8-quanto": Preset("quanto", "qint8", 8, "optimum.quanto"),
    "int4-quanto": Preset("quanto", "qint4", 4, "optimum.quanto"),
    "int2-quanto": Preset("quanto", "qint2", 2, "optimum.quanto"),
    "fp8-quanto": Preset("quanto", "qfloat8", 8, "optimum.quanto"),  # float8 e4m3fn
    "fp8uz-quanto": Preset("quanto", "qfloat8_e4m3fnuz", 8, "optimum.quanto"),
    "int8-torchao": Preset("torchao", "int8", 8, "torchao", conv_weights="qint8"),
    "int4-torchao": Preset("torchao", "int4", 4, "torchao", conv_weights="qint4"),
    "fp8-torchao": Preset("torchao", "fp8", 8, "torchao", conv_weights="qfloat8"),  # float8 e4m3fn, like torchao's
    "nf4-bnb": Preset("bnb", "nf4", 4, "bitsandbytes", conv_weights="qint4"),
}
#: pip names of the packages in :data:`PRESETS`.
PIP_NAMES = {"optimum.quanto": "optimum-quanto", "torchao": "torchao", "bitsandbytes": "bitsandbytes", "gguf": "gguf",
             "mslk": "mslk"}
TEXT_ENCODER_SLOTS = (1, 2, 3, 4)
#: ``--quantization_config`` top-level keys: the denoiser (either name), text encoders, and the fallback.
CONFIG_KEYS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "default")
#: Keys an entry may hold, per backend: the arguments of diffusers' / transformers' QuantoConfig,
#: TorchAoConfig (``quant_type``: keyword arguments of the preset's torchao config class) and
#: BitsAndBytesConfig.
ENTRY_KEYS = {
    "quanto": ("weights_dtype", "weights", "modules_to_not_convert"),
    "torchao": ("quant_type", "modules_to_not_convert"),
    "bnb": ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant",
            "bnb_4bit_quant_storage", "llm_int8_skip_modules"),
}
#: torchao config classes behind the torchao presets (weight-only, and with --quantize_activations).
TORCHAO_CLASSES = {
    ("int8", False): "Int8WeightOnlyConfig", ("int8", True): "Int8DynamicActivationInt8WeightConfig",
    ("fp8", False): "Float8WeightOnlyConfig", ("fp8", True): "Float8DynamicActivationFloat8WeightConfig",
    ("int4", False): "Int4WeightOnlyConfig",
}
def gguf_denoiser(family: str | None) -> str | None:
    """The denoiser class diffusers can load from a single (GGUF) file for ``family``, from the family
    table (``PlannerShape.gguf_single_file``; tests/quantization checks it against diffusers'
    ``SINGLE_FILE_LOADABLE_CLASSES``); None when it cannot."""
    from simpletuner.models.registry import FAMILIES

    info = FAMILIES.get(family or "")
    shape = info.planner if info is not None else None
    return shape.denoiser_class if shape is not None and shape.gguf_single_file else None


def text_encoder_count(family: str | None) -> int | None:
    """How many text encoders ``family`` loads (``PlannerShape.text_encoder_count``); None: unknown here,
    checked when it loads."""
    from simpletuner.models.registry import FAMILIES

    info = FAMILIES.get(family or "")
    return info.planner.text_encoder_count if info is not None and info.planner is not None else None


def _registered_families() -> tuple[str, ...]:
    from simpletuner.models.registry import FAMILIES

    return tuple(FAMILIES)


#: Snapshots of the family table at import (the rules call :func:`gguf_denoiser` / :func:`text_encoder_count`).
GGUF_DENOISERS = {name: gguf_denoiser(name) for name in _registered_families() if gguf_denoiser(name)}
GGUF_MIN_DIFFUSERS = (0, 32)
TEXT_ENCODER_COUNTS = {name: text_encoder_count(name) for name in _registered_families()
                       if text_encoder_count(name) is not None}
DENOISER_SOURCE_OPTIONS = ("pretrained_unet_model_name_or_path", "pretrained_transformer_model_name_or_path")


def preset_of(value: str | None) -> Preset | None:
    """The preset a precision value names; None for unset and ``no_change``."""
    return PRESETS.get(value) if value else None


def component_precisions(config) -> dict[str, str]:
    """Quantized components by role (``denoiser``, ``text_encoder``, ``text_encoder_2``, ...) -> preset name."""
    wanted = {}
    if preset_of(config.base_model_precision):
        wanted["denoiser"] = config.base_model_precision
    for index in TEXT_ENCODER_SLOTS:
        value = getattr(config, f"text_encoder_{index}_precision")
        if preset_of(value):
            wanted[text_encoder_name(index)] = value
    return wanted


def text_encoder_fingerprint(config) -> dict[str, str]:
    """Cache-key parts for quantized text encoders (their embeddings differ from the originals).
    Empty when none is quantized, so caches of unquantized runs keep their keys."""
    parts = {}
    for index in TEXT_ENCODER_SLOTS:
        value = getattr(config, f"text_encoder_{index}_precision")
        if preset_of(value):
            parts[f"text_encoder_{index}_precision"] = value
            if config.quantize_via == "pipeline" and config.quantization_config is not None:
                parts["quantization_config"] = str(config.quantization_config)
    return parts


def text_encoder_name(index: int) -> str:
    """The pipeline component name of text encoder ``index`` (1-based)."""
    return "text_encoder" if index == 1 else f"text_encoder_{index}"


def option_for(role: str) -> str:
    """The option that sets a component's precision, for messages."""
    if role == "denoiser":
        return "base_model_precision"
    index = 1 if role == "text_encoder" else int(role.rsplit("_", 1)[1])
    return f"text_encoder_{index}_precision"


def machine_device() -> str:
    """The device training will run on, judged without importing torch: cuda, mps or cpu."""
    if cuda_visible():
        return "cuda"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mps"
    return "cpu"


def has_package(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return False


def _cuda_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability (imports torch: only called when an fp8 kernel needs it)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))


def _distribution_version(name: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# --- the rules -----------------------------------------------------------------------------------------


def check_presets_on_device(config) -> None:
    """Every requested preset has its package and can run on this machine's device."""
    device = machine_device()
    for role, name in component_precisions(config).items():
        preset = PRESETS[name]
        flag = f"`--{option_for(role)} {name}`"
        if not has_package(preset.package):
            raise ConfigError(f"{flag} needs the {PIP_NAMES[preset.package]} package, which is not installed; "
                              f"pip install {PIP_NAMES[preset.package]}")
        if preset.conv_weights and not has_package("optimum.quanto"):
            raise ConfigError(f"{flag} quantizes the convolutions, which {PIP_NAMES[preset.package]} cannot, with "
                              "optimum-quanto, which is not installed; pip install optimum-quanto")
        if name == "int4-torchao":
            if device != "cuda":
                raise ConfigError(f"{flag}: torchao {_version_text('torchao')} packs int4 weights with the mslk "
                                  f"package's CUDA kernels, and this machine has no NVIDIA GPU (device: {device}); "
                                  "use int4-quanto or nf4-bnb for 4-bit weights here")
            if not has_package("mslk"):
                raise ConfigError(f"{flag}: torchao's Int4WeightOnlyConfig needs the mslk package (its int4 "
                                  "kernels); pip install mslk, or use int4-quanto / nf4-bnb")
        if device == "mps" and name in ("fp8-quanto", "fp8uz-quanto", "fp8-torchao"):
            raise ConfigError(f"{flag}: Apple's MPS device has no float8 types; use int8-quanto or int4-quanto")
        if device == "mps" and preset.backend == "bnb":
            raise ConfigError(f"{flag}: bitsandbytes has no MPS backend; use int4-quanto for 4-bit weights on a Mac")


def _version_text(distribution: str) -> str:
    version = _distribution_version(distribution)
    return ".".join(map(str, version)) if version else "(not installed)"


def check_text_encoder_slots(config) -> None:
    count = text_encoder_count(config.model_family)
    if count is None:
        return
    for index in TEXT_ENCODER_SLOTS[count:]:
        value = getattr(config, f"text_encoder_{index}_precision")
        if preset_of(value):
            raise ConfigError(f"`--text_encoder_{index}_precision {value}`: {config.model_family} has "
                              f"{count} text encoder{'s' if count != 1 else ''}; remove it")


def check_quantized_training(config) -> None:
    """A quantized model is frozen: only adapters train on top of it."""
    wanted = component_precisions(config)
    if config.model_type == "full" and "denoiser" in wanted:
        raise ConfigError(f"`--base_model_precision {config.base_model_precision}` quantizes the base model, whose "
                          "weights then cannot be trained: `--model_type full` needs `--base_model_precision "
                          "no_change`; to train on a quantized base use `--model_type lora`")
    if config.train_text_encoder and config.model_type == "full":
        quantized = [role for role in wanted if role != "denoiser"]
        if quantized:
            raise ConfigError(f"`--train_text_encoder` with `--model_type full` trains the text encoder's weights, "
                              f"but `--{option_for(quantized[0])} {wanted[quantized[0]]}` quantizes them; "
                              "set it to no_change or train a LoRA")
    if config.model_type == "lora" and config.lora_type == "lycoris" and "denoiser" in wanted:
        from simpletuner.options.adapter_rules import parse_lycoris_config

        settings = parse_lycoris_config(config.lycoris_config) if config.lycoris_config else {}
        if not settings.get("bypass_mode"):
            raise ConfigError(f"`--lora_type lycoris` on a quantized base (`--base_model_precision "
                              f"{config.base_model_precision}`) needs \"bypass_mode\": true in `--lycoris_config`: "
                              "without it LyCORIS adds its update to the (quantized) weight tensor itself, which "
                              "torchao and bitsandbytes weights cannot do and which would undo the memory saving")


def check_default_dtype(config) -> None:
    dtype = config.base_model_default_dtype
    if dtype is None:
        return
    if not preset_of(config.base_model_precision) and not gguf_sources(config):
        raise ConfigError(f"`--base_model_default_dtype {dtype}` sets the type of the weights a quantizer leaves "
                          "alone, but the base model is not quantized; set `--base_model_precision` or remove it")
    if dtype == "bf16" and config.mixed_precision == "no":
        raise ConfigError("`--base_model_default_dtype bf16` with `--mixed_precision no`: the base would compute in "
                          "bf16 while its inputs stay fp32; use `--mixed_precision bf16` or "
                          "`--base_model_default_dtype fp32`")
    preset = preset_of(config.base_model_precision)
    if dtype == "fp32" and config.mixed_precision != "no" and preset is not None and preset.backend == "quanto":
        raise ConfigError(f"`--base_model_default_dtype fp32` with `--base_model_precision {config.base_model_precision}` "
                          f"and `--mixed_precision {config.mixed_precision}`: optimum-quanto's weights cannot be cast "
                          "to the autocast type, so a quanto base must be held in the compute type; leave "
                          "`--base_model_default_dtype` unset (or bf16), or use a torchao / nf4-bnb preset")


def check_quantize_activations(config) -> None:
    if not config.quantize_activations:
        return
    name = config.base_model_precision
    preset = preset_of(name)
    if preset is None:
        raise ConfigError("`--quantize_activations` quantizes the activations of a quantized base model; set "
                          "`--base_model_precision` (int8-torchao or fp8-torchao) or remove it")
    if preset.backend == "quanto":
        raise ConfigError(f"`--quantize_activations` with `--base_model_precision {name}`: optimum-quanto's quantized "
                          "activations break the backward pass (a chunked activation, as in GEGLU feed-forwards, "
                          "gets a gradient of the wrong shape) and have no calibrated scales in training; use "
                          "`--base_model_precision int8-torchao`, whose int8 activations are quantized per token "
                          "on the fly")
    if preset.backend == "bnb":
        raise ConfigError("`--quantize_activations` with `--base_model_precision nf4-bnb`: bitsandbytes' 4-bit layers "
                          "quantize weights only; use int8-torchao, or remove `--quantize_activations`")
    if name == "int4-torchao":
        raise ConfigError("`--quantize_activations` with `--base_model_precision int4-torchao`: torchao has no "
                          "int4-weight preset with quantized activations here; use int8-torchao")
    if name == "fp8-torchao":
        device = machine_device()
        capability = _cuda_capability() if device == "cuda" else None
        if capability is None or capability < (8, 9):
            where = f"compute capability {capability[0]}.{capability[1]}" if capability else f"device: {device}"
            raise ConfigError("`--quantize_activations` with `--base_model_precision fp8-torchao` runs float8 "
                              f"matmuls, which need an NVIDIA GPU of compute capability 8.9 or newer ({where}); "
                              "use int8-torchao, or drop `--quantize_activations` (fp8 weights alone run anywhere)")


def check_quantize_via(config) -> None:
    """``--quantize_via pipeline`` and ``--quantization_config``."""
    via = config.quantize_via
    wanted = component_precisions(config)
    if config.quantization_config is not None:
        if via != "pipeline":
            raise ConfigError(f"`--quantization_config` configures diffusers' load-time quantization, which runs with "
                              f"`--quantize_via pipeline`; `--quantize_via {via}` is set. Use pipeline, or remove "
                              "`--quantization_config`")
        parse_quantization_config(config.quantization_config, wanted)
    if via == "pipeline" and wanted.get("denoiser") == "nf4-bnb" and machine_device() != "cuda":
        raise ConfigError(f"`--quantize_via pipeline` with `--base_model_precision nf4-bnb`: diffusers' "
                          f"BitsAndBytesConfig loader refuses to run without an NVIDIA GPU (device: "
                          f"{machine_device()}); use `--quantize_via cpu`, which swaps the linears for bitsandbytes' "
                          "4-bit layers itself")


def parse_quantization_config(value: Any, wanted: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``--quantization_config``: per-component settings, checked against the component's preset."""
    from simpletuner.options.values import read_json_option

    settings = read_json_option("quantization_config", value)
    if not isinstance(settings, dict):
        raise ConfigError(f"`--quantization_config` must be a JSON object keyed by component (e.g. "
                          f"{{\"unet\": {{\"modules_to_not_convert\": [\"conv_in\"]}}}}), got {settings!r}")
    for key, entry in settings.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(f"`--quantization_config`: unknown component {key!r}; use {', '.join(CONFIG_KEYS)}")
        if not isinstance(entry, dict):
            raise ConfigError(f"`--quantization_config`: the {key!r} entry must be an object, got {entry!r}")
    if "unet" in settings and "transformer" in settings:
        raise ConfigError("`--quantization_config`: both \"unet\" and \"transformer\" name the denoiser; keep one")
    if wanted is None:
        return settings
    for key, entry in settings.items():
        roles = _roles_for_key(key, wanted)
        if not roles:
            option = "base_model_precision" if key in ("unet", "transformer") else (
                "text_encoder_N_precision" if key != "default" else "a precision option")
            raise ConfigError(f"`--quantization_config`: the {key!r} entry refines a quantization preset, but that "
                              f"component is not quantized; set `--{option}` to choose the backend")
        for role in roles:
            backend = PRESETS[wanted[role]].backend
            for field in entry:
                if field not in ENTRY_KEYS[backend]:
                    raise ConfigError(f"`--quantization_config`: {key!r} key {field!r} does not apply to "
                                      f"`--{option_for(role)} {wanted[role]}` ({backend}); its keys are "
                                      f"{', '.join(ENTRY_KEYS[backend])}")
            if backend == "bnb" and entry.get("load_in_4bit") is False:
                raise ConfigError(f"`--quantization_config`: {key!r} sets load_in_4bit false, but `--"
                                  f"{option_for(role)} nf4-bnb` loads 4-bit weights")
    return settings


def _roles_for_key(key: str, wanted: dict[str, str]) -> list[str]:
    """Which quantized components an entry of ``--quantization_config`` applies to."""
    if key in ("unet", "transformer"):
        return ["denoiser"] if "denoiser" in wanted else []
    if key == "default":
        return list(wanted)
    if key == "text_encoder":  # the first encoder, and any other without its own entry
        return [role for role in wanted if role.startswith("text_encoder")]
    return [key] if key in wanted else []


def entry_for(settings: dict[str, dict[str, Any]], role: str, denoiser_name: str = "unet") -> dict[str, Any]:
    """The ``--quantization_config`` entry of one component: its own key, then (text encoders)
    ``text_encoder``, then ``default``."""
    if role == "denoiser":
        keys = ("unet", "transformer", "default")
    else:
        keys = (role, "text_encoder", "default")
    for key in keys:
        if key in settings:
            return dict(settings[key])
    return {}


# --- GGUF --------------------------------------------------------------------------------------------


def gguf_denoiser_file(folder: Path) -> Path | None:
    """A denoiser folder that holds a ``.gguf`` file instead of diffusers weights: the file."""
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.gguf"))
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    return files[0] if files and not has_weights else None


def gguf_sources(config) -> list[str]:
    """Where this run's denoiser comes from, when that is a GGUF file."""
    found = []
    for name in DENOISER_SOURCE_OPTIONS:
        value = getattr(config, name)
        if value and str(value).endswith(".gguf"):
            found.append(f"`--{name}` {value}")
    model = config.pretrained_model_name_or_path
    if model and Path(str(model)).is_dir():
        for sub in ("unet", "transformer"):
            file = gguf_denoiser_file(Path(str(model)) / sub)
            if file is not None:
                found.append(f"{file}")
    return found


def check_gguf(config) -> None:
    model = config.pretrained_model_name_or_path
    if model and str(model).endswith(".gguf"):
        raise ConfigError(f"`--pretrained_model_name_or_path` {model} is a GGUF file, which holds the denoiser only; "
                          "point it at the pipeline (folder or hub id) and give the .gguf as "
                          "`--pretrained_transformer_model_name_or_path` / `--pretrained_unet_model_name_or_path`, "
                          "or put it in the pipeline folder's unet/ or transformer/ folder next to its config.json")
    sources = gguf_sources(config)
    if not sources:
        return
    where = sources[0]
    if gguf_denoiser(config.model_family) is None:
        supported = sorted(name for name in _registered_families() if gguf_denoiser(name))
        raise ConfigError(f"{where}: diffusers cannot load the {config.model_family} denoiser from a single GGUF file "
                          f"(supported here: {', '.join(supported)})")
    if not has_package("gguf"):
        raise ConfigError(f"{where}: reading GGUF files needs the gguf package; pip install gguf")
    version = _distribution_version("diffusers")
    if version is not None and version[:2] < GGUF_MIN_DIFFUSERS:
        raise ConfigError(f"{where}: GGUF loading needs diffusers >= 0.32 (installed: {_version_text('diffusers')})")
    if preset_of(config.base_model_precision):
        raise ConfigError(f"{where}: a GGUF denoiser is quantized already; remove `--base_model_precision "
                          f"{config.base_model_precision}` (text encoders may still be quantized)")
    if config.model_type == "full":
        raise ConfigError(f"{where}: GGUF weights are frozen quantized blocks and cannot be trained in full; use "
                          "`--model_type lora`")
    if config.quantize_activations:
        raise ConfigError(f"{where}: `--quantize_activations` does not apply to a GGUF denoiser; remove it")


def quantization_warnings(config) -> list[str]:
    warnings = []
    wanted = component_precisions(config)
    if config.quantize_via == "accelerator" and wanted and machine_device() == "cpu":
        warnings.append("`--quantize_via accelerator`: no accelerator on this machine, so quantization runs on the CPU")
    if config.quantize_via == "pipeline" and "fp8uz-quanto" in wanted.values():
        warnings.append("`--quantize_via pipeline` with fp8uz-quanto: diffusers' QuantoConfig has no e4m3fnuz type "
                        "and loads float8 (e4m3fn) weights; use `--quantize_via cpu` for the fnuz variant")
    return warnings


QUANTIZATION_RULES: tuple[Callable, ...] = (check_presets_on_device, check_text_encoder_slots, check_quantized_training,
                                            check_default_dtype, check_quantize_activations, check_quantize_via,
                                            check_gguf)
