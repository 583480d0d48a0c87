"""ostris ai-toolkit: a YAML job (``job: extension``, ``config.process[0]`` of ``type: sd_trainer``)
with ``network``, ``save``, ``datasets``, ``train``, ``model`` and ``sample`` sections.

Each entry of ``datasets`` becomes one of our dataset entries. ai-toolkit trains a dataset at every
resolution of its ``resolution`` list; we train one size per entry, so a list becomes one entry per
size (sharing the folder, each with its own cache), which is what ai-toolkit's buckets amount to.
``[trigger]`` in prompts and captions is ai-toolkit's placeholder for ``trigger_word``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simpletuner.importers.common import (
    LR_SCHEDULERS, OPTIMIZERS, SAMPLERS, ImportConfigError, ImportedConfig, SamplePrompt, caption_shuffle, dataset_id,
    family_from_model_name, is_set, lookup, parse_prompt_line, read_text)

_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "no", "float32": "no"}


def load_ai_toolkit(path: Path, model_family: str | None = None) -> ImportedConfig:
    """Translate an ai-toolkit YAML job into our settings."""
    process = _first_process(path)
    result = ImportedConfig("ai-toolkit")
    trigger = process.get("trigger_word")
    model = process.get("model") or {}
    result.set("model_family", model_family or _family(model, result))
    _map_model(model, result)
    _map_network(process.get("network") or {}, result)
    _map_train(process.get("train") or {}, result)
    _map_save(process.get("save") or {}, result)
    _map_sample(process.get("sample") or {}, trigger, result)
    for number, dataset in enumerate(process.get("datasets") or []):
        _map_dataset(dataset, number, trigger, result)
    if is_set(process.get("training_folder")):
        name = ((_read_yaml(path).get("config") or {}).get("name")) or "run"
        result.set("output_dir", str(Path(str(process["training_folder"])) / str(name)))
    for key in process:
        if key not in ("type", "training_folder", "device", "trigger_word", "network", "save", "datasets", "train",
                       "model", "sample", "logging", "performance_log_every"):
            result.skip(f"process.{key}", process[key], "no counterpart in simpletuner")
    if is_set(process.get("device")):
        result.notes.append(f"`device: {process['device']}`: the device comes from accelerate's launch settings")
    return result


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # PyYAML, installed with accelerate; imported here so the CLI starts without it

    try:
        data = yaml.safe_load(read_text(path, "ai-toolkit config"))
    except yaml.YAMLError as error:
        raise ImportConfigError(f"ai-toolkit config {str(path)!r} is not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ImportConfigError(f"ai-toolkit config {str(path)!r} must be a YAML mapping with a `config` key")
    return data


def _first_process(path: Path) -> dict[str, Any]:
    config = _read_yaml(path).get("config")
    processes = config.get("process") if isinstance(config, dict) else None
    if not isinstance(processes, list) or not processes or not isinstance(processes[0], dict):
        raise ImportConfigError(f"{str(path)!r}: no `config.process[0]` mapping; is this an ai-toolkit job file?")
    if len(processes) > 1:
        raise ImportConfigError(f"{str(path)!r} has {len(processes)} processes; split them into one file each")
    return processes[0]


def _family(model: dict[str, Any], result: ImportedConfig) -> str:
    flags = (("is_flux", "flux"), ("is_xl", "sdxl"), ("is_v3", "sd3"), ("is_v2", "sd2x"), ("is_pixart_sigma",
             "pixart_sigma"))
    for flag, family in flags:
        if model.get(flag):
            return family
    arch = str(model.get("arch", "")).lower()
    guessed = family_from_model_name(arch or str(model.get("name_or_path", "")))
    if guessed is None:
        guessed = "sd1x"
    result.notes.append(f"model family {guessed!r} guessed from the model section; pass `--model-family` to "
                        "choose another")
    return guessed


def _map_model(model: dict[str, Any], result: ImportedConfig) -> None:
    for key, value in model.items():
        if key == "name_or_path":
            result.set("pretrained_model_name_or_path", str(value))
        elif key in ("is_flux", "is_xl", "is_v3", "is_v2", "is_pixart_sigma", "arch"):
            continue
        elif key == "quantize":
            if value:
                result.set("base_model_precision", "int8-quanto")
                result.notes.append("`model.quantize`: the base model is quantized to int8 with quanto (ai-toolkit "
                                    "uses qfloat8; choose `fp8-quanto` for that)")
        elif key == "low_vram":
            result.skip("model.low_vram", value, "offloading is planned with `simpletuner plan-memory`")
        else:
            result.skip(f"model.{key}", value, "no counterpart in simpletuner")


def _map_network(network: dict[str, Any], result: ImportedConfig) -> None:
    kind = str(network.get("type", "lora")).lower()
    if kind not in ("lora", "locon"):
        result.skip("network.type", kind, "only LoRA has a direct counterpart; LyCORIS needs `lora_type lycoris` "
                                          "and a `lycoris_config` file")
    result.set("model_type", "lora")
    for key, value in network.items():
        if key == "linear":
            result.set("lora_rank", int(value))
        elif key == "linear_alpha":
            result.set("lora_alpha", float(value))
        elif key == "dropout":
            result.set("lora_dropout", float(value))
        elif key != "type":
            result.skip(f"network.{key}", value, "no counterpart (conv ranks and network kwargs need LyCORIS)")


def _map_train(train: dict[str, Any], result: ImportedConfig) -> None:
    direct = {"batch_size": ("train_batch_size", int), "steps": ("max_train_steps", int),
              "gradient_accumulation_steps": ("gradient_accumulation_steps", int),
              "gradient_accumulation": ("gradient_accumulation_steps", int),
              "gradient_checkpointing": ("gradient_checkpointing", bool), "lr": ("learning_rate", float),
              "train_text_encoder": ("train_text_encoder", bool), "max_grad_norm": ("max_grad_norm", float),
              "min_snr_gamma": ("snr_gamma", float), "noise_offset": ("noise_offset", float),
              "seed": ("seed", int), "lr_warmup_steps": ("lr_warmup_steps", int)}
    for key, value in train.items():
        if key in direct and is_set(value):
            name, convert = direct[key]
            result.set(name, convert(value))
            if key == "noise_offset":
                result.set("offset_noise", True)
                result.set("noise_offset_probability", 1.0)
        elif key == "optimizer":
            _choice(result, "optimizer", OPTIMIZERS, "train.optimizer", value)
        elif key == "lr_scheduler":
            _choice(result, "lr_scheduler", LR_SCHEDULERS, "train.lr_scheduler", value)
        elif key == "dtype":
            ours = _DTYPES.get(str(value).lower())
            if ours:
                result.set("mixed_precision", ours)
            else:
                result.skip("train.dtype", value, "use bf16, fp16 or fp32")
        elif key == "ema_config":
            _map_ema(value or {}, result)
        elif key == "train_unet":
            if value is False:
                result.skip("train.train_unet", value, "the denoiser is always trained")
        elif key == "noise_scheduler":
            if str(value).lower() not in ("flowmatch", "ddpm"):
                result.skip("train.noise_scheduler", value, "the family's own training schedule is used")
        elif key == "optimizer_params":
            result.skip("train.optimizer_params", value, "put optimizer keyword arguments in `optimizer_config`")
        elif key == "content_or_style":
            result.skip("train.content_or_style", value, "choose a timestep bias with `timestep_bias_strategy`")
        elif key == "disable_sampling":
            if value:
                result.set("validation_disable", True)
        elif key == "skip_first_sample":
            if value is False:
                result.set("validation_on_startup", True)
        else:
            result.skip(f"train.{key}", value, "no counterpart in simpletuner")


def _map_ema(ema: dict[str, Any], result: ImportedConfig) -> None:
    if ema.get("use_ema"):
        result.set("use_ema", True)
        if is_set(ema.get("ema_decay")):
            result.set("ema_decay", float(ema["ema_decay"]))


def _choice(result: ImportedConfig, name: str, table: dict[str, str], key: str, value: Any) -> None:
    ours = lookup(table, value)
    if ours is None:
        result.skip(key, value, f"no counterpart among our `--{name}` choices {sorted(set(table.values()))}")
    else:
        result.set(name, ours)


def _map_save(save: dict[str, Any], result: ImportedConfig) -> None:
    for key, value in save.items():
        if key == "save_every":
            result.set("checkpoint_step_interval", int(value))
        elif key == "max_step_saves_to_keep":
            result.set("checkpoints_total_limit", int(value))
        elif key == "push_to_hub":
            result.set("push_to_hub", bool(value))
        elif key == "hf_repo_id":
            result.set("hub_model_id", str(value))
        elif key == "hf_private":
            result.set("model_card_private", bool(value))
        elif key == "dtype":
            result.skip("save.dtype", value, "weights are saved in the precision they were trained in")
        else:
            result.skip(f"save.{key}", value, "no counterpart in simpletuner")


def _map_sample(sample: dict[str, Any], trigger: str | None, result: ImportedConfig) -> None:
    """The sample section: run-wide settings become our validation options; each prompt keeps
    ai-toolkit's inline ``--flags`` as its own settings in the prompt library."""
    for key, value in sample.items():
        if key == "sample_every":
            result.set("validation_step_interval", int(value))
        elif key == "sample_steps":
            result.set("validation_num_inference_steps", int(value))
        elif key == "guidance_scale":
            result.set("validation_guidance", float(value))
        elif key == "seed":
            result.set("validation_seed", int(value))
        elif key == "neg":
            result.set("validation_negative_prompt", str(value or ""))
        elif key == "sampler":
            _choice(result, "validation_noise_scheduler", SAMPLERS, "sample.sampler", value)
        elif key in ("width", "height", "prompts"):
            continue
        elif key == "walk_seed":
            if value:
                result.notes.append("`sample.walk_seed`: each library prompt gets its own seed (seed + its index)")
        else:
            result.skip(f"sample.{key}", value, "no counterpart in simpletuner")
    width, height = sample.get("width"), sample.get("height")
    if is_set(width) and is_set(height):
        result.set("validation_resolution", f"{int(width)}x{int(height)}")
    base_seed = sample.get("seed")
    for index, text in enumerate(sample.get("prompts") or []):
        prompt = parse_prompt_line(_with_trigger(str(text), trigger), f"sample.prompts[{index}]")
        if prompt is None:
            continue
        if sample.get("walk_seed") and prompt.seed is None and is_set(base_seed):
            prompt = SamplePrompt(**{**prompt.__dict__, "seed": int(base_seed) + index})
        result.prompts.append(prompt)


def _with_trigger(text: str, trigger: str | None) -> str:
    return text.replace("[trigger]", trigger) if trigger else text


def _map_dataset(dataset: dict[str, Any], number: int, trigger: str | None, result: ImportedConfig) -> None:
    where = f"datasets[{number}]"
    folder = dataset.get("folder_path")
    if not is_set(folder):
        result.skip(f"{where}.folder_path", folder, "only folder datasets are imported")
        return
    taken = {entry["id"] for entry in result.datasets}
    sizes = dataset.get("resolution") or [512]
    sizes = sizes if isinstance(sizes, list) else [sizes]
    base: dict[str, Any] = {"type": "local", "instance_data_dir": str(folder), "caption_strategy": "textfile"}
    extension = str(dataset.get("caption_ext", "txt")).lstrip(".")
    if extension != "txt":
        result.skip(f"{where}.caption_ext", extension, "captions are read from `<image stem>.txt`; rename the files")
    if trigger:
        if "[trigger]" in read_folder_captions_hint(folder):
            # ai-toolkit writes the trigger word where a caption says [trigger]; a caption filter does that here
            base["caption_filter_list"] = [f"s/\\[trigger\\]/{trigger}/"]
        else:
            base["instance_prompt"] = trigger
            base["prepend_instance_prompt"] = True
            result.notes.append(f"{where}: ai-toolkit adds `trigger_word` to captions that lack it; here it is put in "
                                "front of every caption (`prepend_instance_prompt`)")
    if is_set(dataset.get("num_repeats")):
        base["repeats"] = max(int(dataset["num_repeats"]) - 1, 0)
    if dataset.get("is_reg"):
        base["is_regularisation_data"] = True
    for key, value in dataset.items():
        if key in ("folder_path", "resolution", "caption_ext", "num_repeats", "is_reg", "cache_latents_to_disk",
                   "cache_latents"):
            continue
        if key == "caption_dropout_rate":
            result.set("caption_dropout_probability", float(value))
        elif key == "shuffle_tokens":
            if value:
                base["caption_shuffle"] = caption_shuffle(dataset.get("keep_tokens"), dataset.get("token_separator"),
                                                          result, where)
        elif key in ("keep_tokens", "token_separator"):
            continue
        elif key == "flip_x":
            if value:
                base["random_flip"] = True
        elif key == "default_caption":
            base["instance_prompt"] = str(value)
        else:
            result.skip(f"{where}.{key}", value, "no counterpart in simpletuner")
    name = Path(str(folder)).name or f"dataset{number}"
    for size in sizes:
        entry = {"id": dataset_id(f"{name}-{size}" if len(sizes) > 1 else name, taken), **base,
                 "resolution": int(size), "resolution_type": "pixel_area"}
        result.datasets.append(entry)
    if len(sizes) > 1:
        result.notes.append(f"{where}: resolutions {sizes} became {len(sizes)} datasets over the same folder, one per "
                            "size (each is drawn with equal weight)")


def read_folder_captions_hint(folder: Any) -> str:
    """The first caption file's text, to tell whether captions already carry ``[trigger]``."""
    path = Path(str(folder))
    if not path.is_dir():
        return ""
    first = next(iter(sorted(path.glob("*.txt"))), None)
    return first.read_text(encoding="utf-8", errors="replace") if first else ""
