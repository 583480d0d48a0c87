"""kohya sd-scripts: a training TOML (``--config_file``) with its ``dataset_config`` TOML, or a
command line (``accelerate launch train_network.py --flag value ...``) saved in a .sh / .txt file.

kohya's settings are argparse flags; a TOML holds the same names (optionally grouped in tables,
which kohya flattens). Datasets come either from ``dataset_config`` (``[general]``, ``[[datasets]]``
and ``[[datasets.subsets]]``) or from ``train_data_dir`` / ``reg_data_dir``, whose ``<N>_<words>``
subfolders repeat N times and caption uncaptioned images with their words.

Each kohya subset becomes one of our dataset entries: kohya's ``num_repeats`` counts every pass
(1 = seen once) where our ``repeats`` counts extra passes, so N becomes ``repeats: N - 1``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Callable

from simpletuner.importers.common import (
    LR_SCHEDULERS, OPTIMIZERS, SAMPLERS, TRACKERS, ImportConfigError, ImportedConfig, caption_shuffle, dataset_id,
    family_from_model_name, is_set, lookup, parse_prompt_line, read_text, shell_words, square_edge)

#: The training scripts and the family each one trains.
SCRIPT_FAMILIES = {
    "train_network.py": "sd1x", "train_db.py": "sd1x", "fine_tune.py": "sd1x",
    "sdxl_train_network.py": "sdxl", "sdxl_train.py": "sdxl",
    "flux_train_network.py": "flux", "flux_train.py": "flux",
    "sd3_train_network.py": "sd3", "sd3_train.py": "sd3",
}
#: Scripts that train the whole model rather than a LoRA.
FULL_SCRIPTS = ("train_db.py", "fine_tune.py", "sdxl_train.py", "flux_train.py", "sd3_train.py")

#: Settings that only make sense in kohya's own process and have nothing to carry over.
_NOT_NEEDED = {
    "cache_latents": "latents are always cached on disk here",
    "cache_latents_to_disk": "latents are always cached on disk here",
    "cache_text_encoder_outputs": "text embeddings are always cached on disk here",
    "cache_text_encoder_outputs_to_disk": "text embeddings are always cached on disk here",
    "sdpa": "PyTorch's scaled-dot-product attention is the default (`attention_mechanism diffusers`)",
    "save_model_as": "adapters are saved as safetensors in the layout `lora_format` names",
    "persistent_data_loader_workers": "batches come from cached tensors; there are no loader workers to keep",
    "max_data_loader_n_workers": "batches come from cached tensors; there are no loader workers to tune",
    "enable_bucket": "aspect buckets are always on (set `crop` on a dataset to train one shape)",
    "bucket_no_upscale": "use the dataset key `max_upscale_threshold` to limit enlargement",
    "min_bucket_reso": "buckets follow from `resolution` and each image's aspect ratio",
    "max_bucket_reso": "buckets follow from `resolution` and each image's aspect ratio",
    "highvram": "memory placement is planned by `simpletuner plan-memory`",
    "lowram": "memory placement is planned by `simpletuner plan-memory`",
    "mem_eff_attn": "choose `attention_mechanism` instead",
}


def load_kohya(path: Path, model_family: str | None = None) -> ImportedConfig:
    """Translate a kohya TOML or command-line file into our settings."""
    if path.suffix.lower() == ".toml":
        settings, script = _read_toml(path), None
    else:
        settings, script = _read_command_line(path)
    result = ImportedConfig("kohya")
    family = model_family or _family(settings, script, result)
    result.set("model_family", family)
    result.set("model_type", "full" if script in FULL_SCRIPTS else "lora")
    base = path.parent
    _map_options(settings, family, result, base)
    _map_datasets(settings, family, result, base)
    return result


# --- reading ---------------------------------------------------------------------------------------

def _read_toml(path: Path) -> dict[str, Any]:
    """The settings of a kohya config TOML; kohya flattens tables, so ``[training] lr = 1`` is ``lr``."""
    data = _parse_toml(path, "kohya config")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _parse_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text(path, what))
    except tomllib.TOMLDecodeError as error:
        raise ImportConfigError(f"{what} {str(path)!r} is not valid TOML ({error})") from None


def _read_command_line(path: Path) -> tuple[dict[str, Any], str | None]:
    """``--flag value`` pairs after the training script's name (a flag without a value is true;
    flags such as ``--network_args`` take several words). The accelerate flags before the script
    are read for ``--num_processes`` and ``--mixed_precision``."""
    words = shell_words(read_text(path, "kohya command line"), str(path))
    script_at = next((i for i, word in enumerate(words) if Path(word).name in SCRIPT_FAMILIES), None)
    if script_at is None:
        raise ImportConfigError(f"{str(path)!r}: no kohya training script found (one of "
                                f"{sorted(SCRIPT_FAMILIES)}); is this a kohya sd-scripts command line?")
    launcher = _flags(words[:script_at])
    settings = _flags(words[script_at + 1:])
    for name in ("num_processes", "mixed_precision"):
        if name in launcher and name not in settings:
            settings[name] = launcher[name]
    return settings, Path(words[script_at]).name


def _flags(words: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if not word.startswith("--"):
            continue
        name, _, inline = word[2:].partition("=")
        values = [inline] if inline else []
        while not inline and index < len(words) and not words[index].startswith("--"):
            values.append(words[index])
            index += 1
        if not values:
            settings[name] = True
        elif len(values) == 1 and name not in ("network_args", "optimizer_args", "lr_scheduler_args"):
            settings[name] = _scalar(values[0])
        else:
            settings[name] = values
    return settings


def _scalar(text: str) -> Any:
    """A command-line word as kohya's argparse would type it: int, float, or the text."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _family(settings: dict[str, Any], script: str | None, result: ImportedConfig) -> str:
    if script:
        family = SCRIPT_FAMILIES[script]
        return "sd2x" if family == "sd1x" and settings.get("v2") else family
    model = str(settings.get("pretrained_model_name_or_path", ""))
    family = family_from_model_name(model)
    if settings.get("v2"):
        family = "sd2x"
    if family is None:
        family = "sdxl" if settings.get("cache_text_encoder_outputs") else "sd1x"
    result.notes.append(f"model family {family!r} guessed from the model name {model!r} (a TOML does not name its "
                        "script); pass `--model-family` to choose another")
    return family


# --- options ---------------------------------------------------------------------------------------

def _direct(name: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any, ImportedConfig], None]:
    return lambda value, result: result.set(name, convert(value))


def _choice(name: str, table: dict[str, str], what: str) -> Callable[[Any, ImportedConfig], None]:
    def apply(value: Any, result: ImportedConfig) -> None:
        ours = lookup(table, value)
        if ours is None:
            result.skip(what, value, f"no counterpart among our `--{name}` choices; pick one of "
                                     f"{sorted(set(table.values()))}")
        else:
            result.set(name, ours)
    return apply


def _resolution(value: Any, result: ImportedConfig) -> None:
    width, height = _size(value)
    result.set("resolution", square_edge(width, height))
    result.set("resolution_type", "pixel_area")


def _size(value: Any) -> tuple[float, float]:
    """kohya's ``512`` / ``"512,768"`` / ``[512, 768]`` resolution as (width, height)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    numbers = [float(part) for part in parts]
    return (numbers[0], numbers[-1])


def _noise_offset(value: Any, result: ImportedConfig) -> None:
    # kohya adds the offset noise to every step; ours draws it with a probability
    result.set("offset_noise", True)
    result.set("noise_offset", float(value))
    result.set("noise_offset_probability", 1.0)


def _mixed_precision(value: Any, result: ImportedConfig) -> None:
    if value in ("no", "fp16", "bf16"):
        result.set("mixed_precision", value)
    else:
        result.skip("mixed_precision", value, "use `no`, `fp16` or `bf16`")


def _report_to(value: Any, result: ImportedConfig) -> None:
    _choice("report_to", TRACKERS, "log_with")(value, result)


def _save_last(value: Any, result: ImportedConfig) -> None:
    result.set("checkpoints_total_limit", int(value))


def _attention(value: Any, result: ImportedConfig) -> None:
    if value:
        result.set("attention_mechanism", "xformers")


def _guidance(value: Any, result: ImportedConfig) -> None:
    result.set("flux_guidance_mode", "constant")
    result.set("flux_guidance_value", float(value))


#: kohya flag -> how it lands in our options.
OPTION_MAP: dict[str, Callable[[Any, ImportedConfig], None]] = {
    "pretrained_model_name_or_path": _direct("pretrained_model_name_or_path", str),
    "vae": _direct("pretrained_vae_model_name_or_path", str),
    "output_dir": _direct("output_dir", str),
    "logging_dir": _direct("logging_dir", str),
    "log_tracker_name": _direct("tracker_project_name", str),
    "log_with": _report_to,
    "network_dim": _direct("lora_rank", int),
    "network_alpha": _direct("lora_alpha", float),
    "network_dropout": _direct("lora_dropout", float),
    "learning_rate": _direct("learning_rate", float),
    "unet_lr": _direct("learning_rate", float),
    "text_encoder_lr": _direct("text_encoder_lr", float),
    "max_train_steps": _direct("max_train_steps", int),
    "max_train_epochs": _direct("num_train_epochs", int),
    "train_batch_size": _direct("train_batch_size", int),
    "gradient_accumulation_steps": _direct("gradient_accumulation_steps", int),
    "gradient_checkpointing": _direct("gradient_checkpointing", bool),
    "mixed_precision": _mixed_precision,
    "seed": _direct("seed", int),
    "resolution": _resolution,
    "optimizer_type": _choice("optimizer", OPTIMIZERS, "optimizer_type"),
    "lr_scheduler": _choice("lr_scheduler", LR_SCHEDULERS, "lr_scheduler"),
    "lr_warmup_steps": _direct("lr_warmup_steps", int),
    "lr_scheduler_num_cycles": _direct("lr_num_cycles", int),
    "lr_scheduler_power": _direct("lr_power", float),
    "max_grad_norm": _direct("max_grad_norm", float),
    "noise_offset": _noise_offset,
    "min_snr_gamma": _direct("snr_gamma", float),
    "zero_terminal_snr": _direct("rescale_betas_zero_snr", bool),
    "loss_type": _choice("loss_type", {"l2": "l2", "huber": "huber", "smooth_l1": "smooth_l1"}, "loss_type"),
    "huber_c": _direct("huber_c", float),
    "huber_schedule": _choice("huber_schedule", {"snr": "snr", "exponential": "exponential",
                                                 "constant": "constant"}, "huber_schedule"),
    "ip_noise_gamma": _direct("input_perturbation", float),
    "caption_dropout_rate": _direct("caption_dropout_probability", float),
    "xformers": _attention,
    "save_every_n_steps": _direct("checkpoint_step_interval", int),
    "save_every_n_epochs": _direct("checkpoint_epoch_interval", int),
    "save_last_n_steps_state": _save_last,
    "save_last_n_epochs_state": _save_last,
    "sample_every_n_steps": _direct("validation_step_interval", int),
    "sample_every_n_epochs": _direct("validation_epoch_interval", int),
    "sample_sampler": _choice("validation_noise_scheduler", SAMPLERS, "sample_sampler"),
    "num_processes": _direct("num_processes", int),
    "guidance_scale": _guidance,
    "discrete_flow_shift": _direct("flow_schedule_shift", float),
    "t5xxl_max_token_length": _direct("tokenizer_max_length", int),
    "no_half_vae": lambda value, result: result.set("vae_dtype", "fp32") if value else None,
    "v_parameterization": lambda value, result: result.set("prediction_type", "v_prediction") if value else None,
}

#: Settings read elsewhere in this module (datasets, prompts, the script's family and method).
_HANDLED_ELSEWHERE = {
    "dataset_config", "train_data_dir", "reg_data_dir", "sample_prompts", "network_module",
    "network_train_unet_only", "network_train_text_encoder_only", "v2", "shuffle_caption", "keep_tokens",
    "flip_aug", "color_aug", "random_crop", "caption_extension", "caption_separator", "bucket_reso_steps",
    "in_json", "train_text_encoder", "save_last_n_epochs", "save_last_n_steps", "save_state",
}

#: Settings with no counterpart, and why (anything not listed anywhere gets a generic reason).
_REASONS = {
    "output_name": "the adapter file name is fixed (`pytorch_lora_weights.safetensors` in `output_dir`)",
    "save_precision": "weights are saved in the precision they were trained in",
    "clip_skip": "there is no option to take an earlier CLIP layer",
    "max_token_length": "CLIP prompts are not extended past 77 tokens by chunking",
    "full_bf16": "set `mixed_precision bf16`; weights stay in their stored precision",
    "full_fp16": "set `mixed_precision fp16`; weights stay in their stored precision",
    "fp8_base": "choose a quantized base with `base_model_precision` (e.g. `fp8-quanto`)",
    "network_args": "extra network arguments have no general counterpart; LyCORIS settings go in `lycoris_config`",
    "optimizer_args": "put optimizer keyword arguments in `optimizer_config`",
    "lr_scheduler_args": "no counterpart",
    "scale_weight_norms": "max-norm regularisation of LoRA weights is not implemented",
    "prior_loss_weight": "regularisation batches use the normal loss weight",
    "multires_noise_iterations": "pyramid noise is not implemented; `offset_noise` is the nearest",
    "multires_noise_discount": "pyramid noise is not implemented",
    "clip_l": "give a diffusers folder (or hub id) in `pretrained_model_name_or_path`; single-file components "
              "are not loaded",
    "t5xxl": "give a diffusers folder (or hub id) in `pretrained_model_name_or_path`",
    "ae": "give a diffusers folder (or hub id) in `pretrained_model_name_or_path`",
    "timestep_sampling": "choose the flow schedule with `flow_schedule_shift` / `flow_use_uniform_schedule`",
    "model_prediction_type": "the family's prediction type is used",
    "color_aug": "colour augmentation would make cached latents differ per epoch; not supported",
}


def _map_options(settings: dict[str, Any], family: str, result: ImportedConfig, base: Path) -> None:
    for key, value in settings.items():
        if key in _HANDLED_ELSEWHERE:
            continue
        if key in _NOT_NEEDED:
            if value:
                result.notes.append(f"`{key}`: not needed: {_NOT_NEEDED[key]}")
            continue
        apply = OPTION_MAP.get(key)
        if apply is None:
            result.skip(key, value, _REASONS.get(key, "no counterpart in simpletuner"))
            continue
        if is_set(value):
            try:
                apply(value, result)
            except (TypeError, ValueError):
                result.skip(key, value, "the value is not of the kind kohya documents for it")
    _map_method(settings, result)
    _map_alignment(settings, result)
    _map_save_limits(settings, result)
    _map_prompts(settings, result, base)


def _map_method(settings: dict[str, Any], result: ImportedConfig) -> None:
    module = str(settings.get("network_module", "networks.lora"))
    if "lycoris" in module:
        result.skip("network_module", module, "LyCORIS needs `lora_type lycoris` and a `lycoris_config` file with "
                                              "its algorithm; write that file and set both")
    elif is_set(settings.get("network_module")) and "lora" not in module:
        result.skip("network_module", module, "only LoRA networks have a counterpart")
    if result.options.get("model_type") != "lora":
        return
    # kohya's LoRA scripts train text-encoder LoRA too, unless told not to
    if settings.get("network_train_text_encoder_only"):
        result.skip("network_train_text_encoder_only", True, "training the text encoder alone is not supported")
    if settings.get("network_train_unet_only") or settings.get("text_encoder_lr") == 0:
        return
    if result.options.get("model_family") in ("sd1x", "sd2x", "sdxl"):
        result.set("train_text_encoder", True)
    else:
        result.notes.append("kohya trains text-encoder LoRA unless `network_train_unet_only` is set; this family "
                            "trains the denoiser only here")


def _map_alignment(settings: dict[str, Any], result: ImportedConfig) -> None:
    steps = settings.get("bucket_reso_steps")
    if steps is None:
        return
    if int(steps) in (8, 64):
        result.set("aspect_bucket_alignment", int(steps))
    else:
        result.skip("bucket_reso_steps", steps, "bucket sizes step by 8 or 64 pixels (`aspect_bucket_alignment`)")


def _map_save_limits(settings: dict[str, Any], result: ImportedConfig) -> None:
    for key in ("save_last_n_epochs", "save_last_n_steps"):
        if is_set(settings.get(key)):
            result.skip(key, settings[key], "kohya keeps model files of the last N saves; `checkpoints_total_limit` "
                                            "limits checkpoints (set it to keep the last N)")
    if settings.get("save_state"):
        result.notes.append("`save_state`: checkpoints always hold the full training state here")


def _map_prompts(settings: dict[str, Any], result: ImportedConfig, base: Path) -> None:
    """kohya's sample prompt file: one prompt per line with ``--n``/``--w``/``--h``/``--d``/``--l``/``--s``."""
    source = settings.get("sample_prompts")
    if not is_set(source):
        return
    path = _existing(Path(str(source)), base)
    if path is None:
        result.skip("sample_prompts", source, "the prompt file was not found here; import it where it exists, or "
                                              "write `user_prompt_library` by hand")
        return
    if path.suffix.lower() not in ("", ".txt"):
        result.skip("sample_prompts", source, "only the text form of kohya's prompt file (one prompt per line) is read")
        return
    for number, line in enumerate(read_text(path, "sample prompt file").splitlines(), start=1):
        prompt = parse_prompt_line(line, f"{path}, line {number}")
        if prompt is not None:
            result.prompts.append(prompt)


def _existing(path: Path, base: Path) -> Path | None:
    """``path`` as written (from the working directory), else beside the imported file."""
    for candidate in (path, base / path):
        if candidate.exists():
            return candidate
    return None


# --- datasets --------------------------------------------------------------------------------------

#: Subset settings kohya takes from [general], then [[datasets]], then the subset itself.
_INHERITED = ("resolution", "caption_extension", "keep_tokens", "shuffle_caption", "flip_aug", "color_aug",
              "random_crop", "caption_dropout_rate", "class_tokens", "enable_bucket", "batch_size",
              "caption_separator")


def _map_datasets(settings: dict[str, Any], family: str, result: ImportedConfig, base: Path) -> None:
    taken: set[str] = set()
    if is_set(settings.get("dataset_config")):
        path = _existing(Path(str(settings["dataset_config"])), base)
        if path is None:
            raise ImportConfigError(f"dataset_config {str(settings['dataset_config'])!r} (named in the kohya config) "
                                    "does not exist; import where it exists or fix the path")
        data = _parse_toml(path, "kohya dataset config")
        general = data.get("general", {})
        for dataset in data.get("datasets", []):
            group = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
            for subset in dataset.get("subsets", []):
                _add_subset({**group, **subset}, result, taken, path.parent)
        return
    defaults = {key: settings[key] for key in _INHERITED if key in settings}
    for key, is_reg in (("train_data_dir", False), ("reg_data_dir", True)):
        if is_set(settings.get(key)):
            _add_repeat_folders(str(settings[key]), is_reg, defaults, result, taken, key)
    if not result.datasets:
        result.skip("dataset_config", None, "neither `dataset_config` nor `train_data_dir` is set: add a dataset to "
                                            "multidatabackend.json by hand")


def _add_repeat_folders(root: str, is_reg: bool, defaults: dict[str, Any], result: ImportedConfig,
                        taken: set[str], key: str) -> None:
    """kohya's DreamBooth layout (``<root>/<N>_<words>`` subfolders) is our ``folder_repeats``: one
    entry whose subfolders become datasets repeated N times, uncaptioned images trained on <words>."""
    entry = _subset_entry({**defaults, "image_dir": root, "is_reg": is_reg}, result, taken, key)
    entry.pop("repeats", None)
    entry.pop("instance_prompt", None)
    entry["caption_strategy"] = "textfile"
    entry["folder_repeats"] = True
    result.datasets.append(entry)
    if not Path(root).is_dir():
        result.notes.append(f"`{key}`: folder {root!r} is not here; `simpletuner train` will expand its `<N>_<words>` "
                            "subfolders where it exists")


def _add_subset(subset: dict[str, Any], result: ImportedConfig, taken: set[str], base: Path) -> None:
    if not is_set(subset.get("image_dir")):
        result.skip("subsets.metadata_file", subset.get("metadata_file"),
                    "fine-tuning metadata JSON files are not read; point a subset at its image folder")
        return
    result.datasets.append(_subset_entry(subset, result, taken, f"subset {subset['image_dir']}"))


def _subset_entry(subset: dict[str, Any], result: ImportedConfig, taken: set[str], where: str) -> dict[str, Any]:
    """Our dataset entry for one kohya subset (its settings merged down from [general] and [[datasets]])."""
    image_dir = subset["image_dir"]
    folder = Path(str(image_dir))
    entry: dict[str, Any] = {"id": dataset_id(folder.name, taken), "type": "local", "instance_data_dir": str(folder)}
    repeats = int(subset.get("num_repeats", 1))
    entry["repeats"] = max(repeats - 1, 0)
    _subset_captions(subset, folder, entry, result, where)
    if is_set(subset.get("resolution")):
        width, height = _size(subset["resolution"])
        entry["resolution"] = square_edge(width, height)
        entry["resolution_type"] = "pixel_area"
    if subset.get("enable_bucket") is False:
        entry["crop"] = True
        entry["crop_aspect"] = "square"
    if subset.get("random_crop"):
        entry["crop"] = True
        entry["crop_style"] = "random"
    if subset.get("is_reg"):
        entry["is_regularisation_data"] = True
    _subset_augmentations(subset, entry, result, where)
    if is_set(subset.get("batch_size")):
        result.set("train_batch_size", int(subset["batch_size"]))
    if is_set(subset.get("caption_dropout_rate")):
        result.set("caption_dropout_probability", float(subset["caption_dropout_rate"]))
    return entry


def _subset_captions(subset: dict[str, Any], folder: Path, entry: dict[str, Any], result: ImportedConfig,
                     where: str) -> None:
    """kohya reads ``<stem><caption_extension>`` and falls back to ``class_tokens``; we read
    ``<stem>.txt``, or give every image the instance prompt."""
    extension = str(subset.get("caption_extension", ".caption"))
    if not extension.startswith("."):
        extension = "." + extension
    tokens = subset.get("class_tokens")
    has_txt = folder.is_dir() and any(folder.glob("*.txt"))
    if is_set(tokens) and (not folder.is_dir() or not has_txt):
        entry["caption_strategy"] = "instanceprompt"
        entry["instance_prompt"] = str(tokens)
        return
    entry["caption_strategy"] = "textfile"
    if extension != ".txt":
        result.skip(f"{where}: caption_extension", extension, "captions are read from `<image stem>.txt`; rename the "
                                                             "caption files to .txt")
    if is_set(tokens):
        result.notes.append(f"{where}: images without a .txt caption are skipped here (kohya would train them on "
                            f"{tokens!r})")


def _subset_augmentations(subset: dict[str, Any], entry: dict[str, Any], result: ImportedConfig, where: str) -> None:
    if subset.get("shuffle_caption"):
        entry["caption_shuffle"] = caption_shuffle(subset.get("keep_tokens"), subset.get("caption_separator"), result,
                                                   where)
    elif is_set(subset.get("keep_tokens")) and subset.get("keep_tokens"):
        result.notes.append(f"{where}: `keep_tokens` only matters with `shuffle_caption`; dropped")
    if subset.get("flip_aug"):
        entry["random_flip"] = True
    if subset.get("color_aug"):
        result.skip(f"{where}: color_aug", True, _REASONS["color_aug"])
