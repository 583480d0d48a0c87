"""Nerogar OneTrainer: the JSON its UI exports (a TrainConfig), with the concepts and samples
inlined (``concepts`` / ``samples``) or named by ``concept_file_name`` / ``sample_definition_file_name``.

Each enabled concept becomes one of our dataset entries. OneTrainer's ``balancing`` (with the
``REPEATS`` strategy) counts passes per epoch like kohya's ``num_repeats``, so N becomes
``repeats: N - 1``; fractional values are rounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simpletuner.importers.common import (
    LR_SCHEDULERS, OPTIMIZERS, SAMPLERS, ImportConfigError, ImportedConfig, SamplePrompt, caption_shuffle, dataset_id,
    is_set,
    lookup, read_text)

#: OneTrainer's model types (prefixes) -> our families.
MODEL_TYPES = (
    ("STABLE_DIFFUSION_XL", "sdxl"), ("STABLE_DIFFUSION_3", "sd3"), ("STABLE_DIFFUSION_2", "sd2x"),
    ("STABLE_DIFFUSION_15", "sd1x"), ("STABLE_DIFFUSION_14", "sd1x"), ("FLUX_DEV", "flux"), ("FLUX", "flux"),
    ("PIXART_SIGMA", "pixart_sigma"), ("SANA", "sana"), ("HI_DREAM", "hidream"), ("QWEN", "qwen_image"),
)
_DTYPES = {"BFLOAT_16": "bf16", "FLOAT_16": "fp16", "FLOAT_32": "no"}
_ENUM_SCHEDULERS = {"CONSTANT": "constant", "LINEAR": "linear", "COSINE": "cosine",
                    "COSINE_WITH_RESTARTS": "cosine_with_restarts", "COSINE_WITH_HARD_RESTARTS": "cosine_with_restarts"}

#: Settings without a counterpart that are worth a specific reason.
_REASONS = {
    "workspace_dir": "samples, logs and checkpoints go under `output_dir`",
    "cache_dir": "set `cache_dir` yourself if the default `cache` folder does not suit",
    "output_model_format": "adapters are saved as safetensors",
    "output_dtype": "weights are saved in the precision they were trained in",
    "text_encoder_layer_skip": "there is no option to take an earlier text-encoder layer",
    "masked_training": "use a `conditioning` dataset with `conditioning_type: mask`",
    "latent_caching": "latents are always cached",
    "aspect_ratio_bucketing": "aspect buckets are always on",
    "backup_after": "checkpoints are scheduled with `checkpoint_step_interval` / `checkpoint_epoch_interval`",
    "sample_image_format": "validation images are PNG",
}
#: Settings that are read elsewhere or only describe OneTrainer's own UI / process.
_QUIET = {
    "__version", "training_method", "model_type", "base_model_name", "output_model_destination", "concepts",
    "samples", "concept_file_name", "sample_definition_file_name", "debug_mode", "debug_dir", "tensorboard",
    "continue_last_backup", "train_device", "temp_device", "only_cache", "clear_cache_before_training",
    "sample_after", "sample_after_unit", "save_after", "save_after_unit", "save_every", "save_every_unit",
    "optimizer", "learning_rate_scheduler", "unet", "text_encoder", "text_encoder_2", "prior", "transformer",
    "train_text_encoder", "train_unet", "unet_learning_rate", "text_encoder_learning_rate", "weight_decay",
    "train_dtype", "ema", "ema_decay", "loss_weight_fn", "loss_weight_strength", "resolution", "lora_rank",
    "lora_alpha", "learning_rate", "epochs", "batch_size", "gradient_accumulation_steps", "seed",
    "learning_rate_warmup_steps", "learning_rate_cycles", "offset_noise_weight",
    "rescale_noise_scheduler_to_zero_terminal_snr", "force_v_prediction", "gradient_checkpointing",
    "attention_mechanism", "max_grad_norm", "lora_weight_dtype", "weight_dtype", "dropout_probability",
    "tensorboard_expose", "validation", "latent_caching_epochs", "backup_after_unit", "backup_before_save",
    "rolling_backup", "rolling_backup_count", "secrets", "embedding", "additional_embeddings",
}


def load_onetrainer(path: Path, model_family: str | None = None) -> ImportedConfig:
    """Translate a OneTrainer config export into our settings."""
    data = _read_json(path, "OneTrainer config")
    if not isinstance(data, dict) or "model_type" not in data:
        raise ImportConfigError(f"{str(path)!r}: no `model_type` key; is this a OneTrainer config export?")
    result = ImportedConfig("onetrainer")
    result.set("model_family", model_family or _family(str(data["model_type"]), result))
    _map_method(data, result)
    _map_training(data, result)
    _map_schedule(data, result)
    for concept in _listed(data, "concepts", "concept_file_name", path):
        _map_concept(concept, result, path.parent)
    for sample in _listed(data, "samples", "sample_definition_file_name", path):
        _map_sample(sample, result)
    for key, value in data.items():
        if key in _QUIET or key.endswith("_weight_dtype"):
            continue
        if key in _REASONS:
            result.skip(key, value, _REASONS[key])
        elif is_set(value) and value is not False:
            result.skip(key, value, "no counterpart in simpletuner")
    return result


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as error:
        raise ImportConfigError(f"{what} {str(path)!r} is not valid JSON ({error})") from None


def _family(model_type: str, result: ImportedConfig) -> str:
    for prefix, family in MODEL_TYPES:
        if model_type.upper().startswith(prefix):
            return family
    raise ImportConfigError(f"OneTrainer model_type {model_type!r} has no counterpart family here; pass "
                            "`--model-family` if the model is one of ours")


def _listed(data: dict[str, Any], inline: str, file_key: str, path: Path) -> list[dict[str, Any]]:
    """The concepts (or samples): inlined in the export, else read from the file the config names."""
    if isinstance(data.get(inline), list):
        return [item for item in data[inline] if isinstance(item, dict)]
    if not is_set(data.get(file_key)):
        return []
    name = Path(str(data[file_key]))
    for candidate in (name, path.parent / name):
        if candidate.is_file():
            items = _read_json(candidate, f"OneTrainer {inline} file")
            return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    return []


def _map_method(data: dict[str, Any], result: ImportedConfig) -> None:
    method = str(data.get("training_method", "LORA")).upper()
    if method == "LORA":
        result.set("model_type", "lora")
        if is_set(data.get("lora_rank")):
            result.set("lora_rank", int(data["lora_rank"]))
        if is_set(data.get("lora_alpha")):
            result.set("lora_alpha", float(data["lora_alpha"]))
        if is_set(data.get("dropout_probability")) and data["dropout_probability"]:
            result.set("lora_dropout", float(data["dropout_probability"]))
    elif method == "FINE_TUNE":
        result.set("model_type", "full")
    else:
        raise ImportConfigError(f"OneTrainer training_method {method!r} has no counterpart (LORA and FINE_TUNE do)")
    result.set("pretrained_model_name_or_path", str(data.get("base_model_name", "")))
    destination = data.get("output_model_destination")
    if is_set(destination):
        result.set("output_dir", str(Path(str(destination)).with_suffix("")))
        result.notes.append(f"`output_model_destination` {destination!r}: the adapter is written inside the folder "
                            f"{str(Path(str(destination)).with_suffix(''))!r}")


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested model-part section (``unet``, ``text_encoder``) of newer exports; {} in older ones."""
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def _map_training(data: dict[str, Any], result: ImportedConfig) -> None:
    simple = {"learning_rate": ("learning_rate", float), "epochs": ("num_train_epochs", int),
              "batch_size": ("train_batch_size", int), "seed": ("seed", int),
              "gradient_accumulation_steps": ("gradient_accumulation_steps", int),
              "learning_rate_warmup_steps": ("lr_warmup_steps", int), "learning_rate_cycles": ("lr_num_cycles", int),
              "max_grad_norm": ("max_grad_norm", float)}
    for key, (name, convert) in simple.items():
        if is_set(data.get(key)):
            result.set(name, convert(data[key]))
    denoiser = _section(data, "unet") or _section(data, "transformer") or _section(data, "prior")
    if is_set(denoiser.get("learning_rate")) or is_set(data.get("unet_learning_rate")):
        result.set("learning_rate", float(denoiser.get("learning_rate") or data["unet_learning_rate"]))
    encoder = _section(data, "text_encoder")
    trains_encoder = encoder.get("train", data.get("train_text_encoder", False))
    if trains_encoder:
        result.set("train_text_encoder", True)
        rate = encoder.get("learning_rate", data.get("text_encoder_learning_rate"))
        if is_set(rate):
            result.set("text_encoder_lr", float(rate))
    if is_set(data.get("resolution")):
        edge = str(data["resolution"]).split(",")[0].split("x")[0]
        result.set("resolution", int(edge))
        result.set("resolution_type", "pixel_area")
    if data.get("train_dtype") in _DTYPES:
        result.set("mixed_precision", _DTYPES[data["train_dtype"]])
    gradient = data.get("gradient_checkpointing")
    if gradient in (True, "ON", "CPU_OFFLOADED"):
        result.set("gradient_checkpointing", True)
    if is_set(data.get("offset_noise_weight")) and data["offset_noise_weight"]:
        result.set("offset_noise", True)
        result.set("noise_offset", float(data["offset_noise_weight"]))
        result.set("noise_offset_probability", 1.0)
    if data.get("rescale_noise_scheduler_to_zero_terminal_snr"):
        result.set("rescale_betas_zero_snr", True)
    if data.get("force_v_prediction"):
        result.set("prediction_type", "v_prediction")
    if str(data.get("ema", "OFF")).upper() != "OFF":
        result.set("use_ema", True)
        if is_set(data.get("ema_decay")):
            result.set("ema_decay", float(data["ema_decay"]))
    if str(data.get("loss_weight_fn", "CONSTANT")).upper() == "MIN_SNR_GAMMA":
        result.set("snr_gamma", float(data.get("loss_weight_strength", 5.0)))
    attention = str(data.get("attention_mechanism", "")).upper()
    if attention == "XFORMERS":
        result.set("attention_mechanism", "xformers")
    _map_optimizer(data, result)


def _map_optimizer(data: dict[str, Any], result: ImportedConfig) -> None:
    optimizer = data.get("optimizer")
    settings = optimizer if isinstance(optimizer, dict) else {"optimizer": optimizer}
    name = settings.get("optimizer")
    if is_set(name):
        ours = lookup(OPTIMIZERS, str(name).replace("_", ""))
        if ours is None:
            result.skip("optimizer", name, f"no counterpart among our `--optimizer` choices")
        else:
            result.set("optimizer", ours)
    decay = settings.get("weight_decay", data.get("weight_decay"))
    if is_set(decay):
        result.set("adam_weight_decay", float(decay))
    for key, name_ in (("beta1", "adam_beta1"), ("beta2", "adam_beta2"), ("eps", "adam_epsilon")):
        if is_set(settings.get(key)):
            result.set(name_, float(settings[key]))
    scheduler = data.get("learning_rate_scheduler")
    if is_set(scheduler):
        ours = _ENUM_SCHEDULERS.get(str(scheduler).upper()) or lookup(LR_SCHEDULERS, scheduler)
        if ours is None:
            result.skip("learning_rate_scheduler", scheduler, "no counterpart among our `--lr_scheduler` choices")
        else:
            result.set("lr_scheduler", "constant_with_warmup" if ours == "constant" and data.get(
                "learning_rate_warmup_steps") else ours)


def _map_schedule(data: dict[str, Any], result: ImportedConfig) -> None:
    """``sample_after`` / ``save_every`` with their units: steps and epochs map, minutes do not."""
    for amount_key, unit_key, step_option, epoch_option in (
            ("sample_after", "sample_after_unit", "validation_step_interval", "validation_epoch_interval"),
            ("save_every", "save_every_unit", "checkpoint_step_interval", "checkpoint_epoch_interval")):
        amount, unit = data.get(amount_key), str(data.get(unit_key, "NEVER")).upper()
        if not is_set(amount) or unit == "NEVER" or not amount:
            continue
        if unit == "STEP":
            result.set(step_option, int(amount))
        elif unit == "EPOCH":
            result.set(epoch_option, int(amount))
        else:
            result.skip(f"{amount_key} / {unit_key}", f"{amount} {unit}", f"schedules count steps or epochs, not "
                                                                         f"{unit.lower()}s; set `{step_option}`")


def _map_concept(concept: dict[str, Any], result: ImportedConfig, base: Path) -> None:
    name = str(concept.get("name") or Path(str(concept.get("path", "concept"))).name)
    where = f"concept {name!r}"
    if concept.get("enabled") is False:
        result.notes.append(f"{where}: disabled in OneTrainer; written with `disabled: true`")
    taken = {entry["id"] for entry in result.datasets}
    entry: dict[str, Any] = {"id": dataset_id(name, taken), "type": "local", "instance_data_dir": str(concept.get("path", ""))}
    if concept.get("enabled") is False:
        entry["disabled"] = True
    strategy = str(concept.get("balancing_strategy", "REPEATS")).upper()
    balancing = concept.get("balancing", concept.get("repeats", 1.0))
    if strategy == "REPEATS" and is_set(balancing):
        entry["repeats"] = max(int(round(float(balancing))) - 1, 0)
    elif is_set(balancing):
        result.skip(f"{where}: balancing", f"{balancing} {strategy}", "balancing by sample count is not supported; "
                                                                     "use `repeats` or `probability`")
    if concept.get("validation_concept"):
        entry["dataset_type"] = "eval"
    text = concept.get("text") if isinstance(concept.get("text"), dict) else {}
    _concept_captions(text, entry, result, where)
    image = concept.get("image") if isinstance(concept.get("image"), dict) else {}
    if image.get("enable_random_flip"):
        entry["random_flip"] = True
    if image.get("enable_fixed_flip"):
        result.skip(f"{where}: image.enable_fixed_flip", True, "always training on the mirror image is not supported; "
                                                             "flip the files, or use `random_flip`")
    for key, value in image.items():
        if key.startswith("enable_") and value and key not in ("enable_random_flip", "enable_fixed_flip",
                                                               "enable_crop_jitter"):
            result.skip(f"{where}: image.{key}", value, "image augmentations would change cached latents every epoch; "
                                                        "not supported")
    if concept.get("include_subdirectories") is False:
        result.notes.append(f"{where}: folders are always searched recursively here")
    if is_set(concept.get("loss_weight")) and float(concept["loss_weight"]) != 1.0:
        result.skip(f"{where}: loss_weight", concept["loss_weight"], "per-dataset loss weights are not supported")
    result.datasets.append(entry)


def _concept_captions(text: dict[str, Any], entry: dict[str, Any], result: ImportedConfig, where: str) -> None:
    source = str(text.get("prompt_source", "sample")).lower()
    if source == "sample":
        entry["caption_strategy"] = "textfile"
    elif source == "filename":
        entry["caption_strategy"] = "filename"
    elif source == "concept":
        prompt_file = Path(str(text.get("prompt_path", "")))
        lines = [line.strip() for line in prompt_file.read_text(encoding="utf-8").splitlines()
                 if line.strip()] if prompt_file.is_file() else []
        if lines:
            entry["caption_strategy"] = "instanceprompt"
            entry["instance_prompt"] = lines[0]
            if len(lines) > 1:
                result.skip(f"{where}: text.prompt_path", str(prompt_file), f"one prompt for the whole dataset is "
                                                                            f"used (the first of {len(lines)})")
        else:
            entry["caption_strategy"] = "textfile"
            result.skip(f"{where}: text.prompt_path", text.get("prompt_path"), "the concept's prompt file was not "
                                                                              "found here; captions are read from .txt")
    if text.get("enable_tag_shuffling"):
        entry["caption_shuffle"] = caption_shuffle(text.get("keep_tags_count"), text.get("tag_delimiter"), result,
                                                   where)
    if text.get("tag_dropout_enable"):
        result.skip(f"{where}: text.tag_dropout_enable", True, "tag dropout is not supported; "
                                                               "`caption_dropout_probability` drops whole captions")


def _map_sample(sample: dict[str, Any], result: ImportedConfig) -> None:
    if sample.get("enabled") is False or not is_set(sample.get("prompt")):
        return
    seed = None if sample.get("random_seed") else sample.get("seed")
    result.prompts.append(SamplePrompt(
        prompt=str(sample["prompt"]),
        negative_prompt=sample.get("negative_prompt") or None,
        seed=int(seed) if is_set(seed) else None,
        steps=int(sample["diffusion_steps"]) if is_set(sample.get("diffusion_steps")) else None,
        guidance=float(sample["cfg_scale"]) if is_set(sample.get("cfg_scale")) else None,
        width=int(sample["width"]) if is_set(sample.get("width")) else None,
        height=int(sample["height"]) if is_set(sample.get("height")) else None,
    ))
    scheduler = sample.get("noise_scheduler")
    if is_set(scheduler):
        ours = lookup(SAMPLERS, str(scheduler).lower())
        if ours is not None:
            result.set("validation_noise_scheduler", ours)
