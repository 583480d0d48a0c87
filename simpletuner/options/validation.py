"""Cross-field rules, checked before any model or dataset is loaded.

Each rule is a small function that returns nothing or raises :class:`ConfigError` whose message names
the key(s), the value(s) and the fix. Rules that only deserve a warning return a message instead.
Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simpletuner.models.registry import FAMILIES, family_info
from simpletuner.options import ConfigError, all_options
from simpletuner.options.adapter_rules import ADAPTER_RULES
from simpletuner.options.files import load_json_file, names_a_file
from simpletuner.options.messages import show_value
from simpletuner.options.spec import MAX_PROCESSES, MAX_SEED
from simpletuner.options.causal_rules import CAUSAL_RULES
from simpletuner.options.checkpoint_rules import CHECKPOINT_RULES, checkpoint_warnings
from simpletuner.options.controlnet_rules import CONTROLNET_RULES
from simpletuner.options.crepa_rules import CREPA_RULES
from simpletuner.options.urepa_rules import UREPA_RULES
from simpletuner.options.alignment_rules import ALIGNMENT_RULES
from simpletuner.options.deepspeed_rules import DEEPSPEED_RULES
from simpletuner.options.distillation_rules import DISTILLATION_RULES, distillation_warnings
from simpletuner.options.distributed_rules import DISTRIBUTED_RULES
from simpletuner.options.deepfloyd_rules import check_deepfloyd, deepfloyd_warnings
from simpletuner.options.eval_rules import EVAL_RULES, eval_warnings
from simpletuner.options.flux_rules import check_flux, flux_warnings
from simpletuner.options.ltx_rules import LTX_RULES
from simpletuner.options.memory_rules import MEMORY_RULES, memory_warnings
from simpletuner.options.precision_rules import DISPATCHER_BACKENDS, PRECISION_RULES
from simpletuner.options.publishing_rules import PUBLISHING_RULES
from simpletuner.options.quantization_rules import QUANTIZATION_RULES, quantization_warnings
from simpletuner.options.reporting_rules import REPORTING_RULES
from simpletuner.options.scheduled_sampling_rules import SCHEDULED_SAMPLING_RULES
from simpletuner.options.sdxl_rules import check_sdxl, sdxl_warnings
from simpletuner.options.sequence_parallel_rules import SEQUENCE_PARALLEL_RULES
from simpletuner.options.training_rules import TRAINING_RULES
from simpletuner.options.tread_rules import TREAD_RULES
from simpletuner.options.validation_rules import VALIDATION_RULES, validation_option_warnings
from simpletuner.options.video_validation_rules import VIDEO_VALIDATION_RULES
from simpletuner.options.wan_rules import WAN_RULES
from simpletuner.training.optim import OPTIMIZERS, parse_optimizer_config

# Values of implemented options that the trainer cannot act on yet. Keeping them here (instead of
# narrowing the table's choices) lets `--help` show the full vocabulary users know from other trainers.
SUPPORTED_VALUES: dict[str, tuple] = {
    "optimizer": tuple(OPTIMIZERS),
    "lr_scheduler": ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial", "sine"),
    "mixed_precision": ("no", "bf16", "fp16"),  # fp8: options/precision_rules.py says why not
    "attention_mechanism": tuple(name for name in DISPATCHER_BACKENDS if name != "sla" and not name.startswith("sage")),
    "lora_type": ("standard", "lycoris"),
    "resolution_type": ("pixel", "pixel_area", "area"),
    "validation_noise_scheduler": ("ddim", "ddpm", "euler", "euler-a", "unipc", "dpm++"),
}

LORA_ONLY_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout")
#: The longest T5 prompt diffusers' pipelines encode.
T5_MAX_TOKENS = 512


def check_required(config) -> None:
    missing = [o.name for o in all_options() if o.required and getattr(config, o.name) in (None, "")]
    if missing:
        raise ConfigError(
            "missing required option(s): " + ", ".join(f"`--{m}`" for m in missing)
            + "; set them on the command line or in config/config.json"
        )


def check_unimplemented(config) -> None:
    """An option the trainer does not act on yet may not be changed from its default."""
    for option in all_options():
        if option.implemented:
            continue
        value = getattr(config, option.name)
        if value != option.default and not (value in (None, "", [], {}) and option.default in (None, "", [], {})):
            raise ConfigError(
                f"`--{option.name}` is not supported yet (got {value!r}); remove it from your config or command line"
            )


def check_supported_values(config) -> None:
    for name, supported in SUPPORTED_VALUES.items():
        value = getattr(config, name)
        if value is not None and value not in supported:
            raise ConfigError(
                f"`--{name} {value}` is not supported yet; supported values: {', '.join(supported)}"
            )


def check_family(config) -> None:
    info = family_info(config.model_family)
    if config.model_flavour in info.refused_flavours:
        raise ConfigError(f"`--model_flavour {config.model_flavour}` is not supported for {info.name} yet: "
                          f"{info.refused_flavours[config.model_flavour]}")
    if config.model_flavour is not None and config.model_flavour not in info.flavours:
        raise ConfigError(
            f"`--model_flavour {config.model_flavour}` is not a flavour of {info.name}; "
            f"choose one of: {', '.join(info.flavours)}"
        )
    if config.model_type not in info.model_types:
        raise ConfigError(f"`--model_type {config.model_type}` is not available for {info.name}")
    if config.prediction_type is not None and config.prediction_type not in info.prediction_types:
        raise ConfigError(
            f"`--prediction_type {config.prediction_type}` is not supported for {info.name}; "
            f"use one of: {', '.join(info.prediction_types)}"
        )


def check_family_options(config) -> None:
    """Options that belong to some families (``FamilyInfo.options``) may only be set for those."""
    info = family_info(config.model_family)
    for name in sorted({option for entry in FAMILIES.values() for option in entry.options} - set(info.options)):
        if name in config.explicit and getattr(config, name) is not None:
            users = ", ".join(entry.name for entry in FAMILIES.values() if name in entry.options)
            raise ConfigError(f"`--{name}` only applies to {users}, not to {info.name}; remove it")
    length = config.tokenizer_max_length
    if "tokenizer_max_length" in info.options and length is not None and not 1 <= length <= T5_MAX_TOKENS:
        raise ConfigError(f"`--tokenizer_max_length` = {length} must be between 1 and {T5_MAX_TOKENS} (the most "
                          "T5 tokens diffusers' pipelines accept)")


def check_conflicts(config) -> None:
    if config.model_type == "full":
        changed = [n for n in LORA_ONLY_OPTIONS if n in config.explicit]
        if changed:
            raise ConfigError(
                f"`--{changed[0]}` only applies to `--model_type lora`, but `--model_type full` is set; "
                "remove one of them"
            )
    if config.validation_disable and config.validation_step_interval:
        raise ConfigError(
            "`--validation_disable` and `--validation_step_interval` conflict: validation cannot be both off "
            "and scheduled; remove one of them"
        )


def check_loss_settings(config) -> None:
    """Loss and noise options that only act together with another one (their ranges are in the table)."""
    if config.loss_type == "l2":
        for name in ("huber_schedule", "huber_c"):
            if name in config.explicit:
                raise ConfigError(f"`--{name}` only applies to `--loss_type huber` or `smooth_l1`, but "
                                  "`--loss_type l2` is set; remove one of them")
    if config.use_soft_min_snr and config.snr_gamma:
        raise ConfigError("`--use_soft_min_snr` and `--snr_gamma` conflict: soft Min-SNR replaces the hard clamp "
                          "(its strength comes from `--soft_min_snr_sigma_data`); remove one of them")
    if not config.offset_noise:
        for name in ("noise_offset", "noise_offset_probability"):
            if name in config.explicit:
                raise ConfigError(f"`--{name}` has no effect without `--offset_noise true`; add it or remove "
                                  f"`--{name}`")
    if config.input_perturbation_steps and not config.input_perturbation:
        raise ConfigError("`--input_perturbation_steps` needs `--input_perturbation` > 0")


EMA_OPTIONS = ("ema_decay", "ema_device", "ema_cpu_only", "ema_update_interval", "ema_foreach_disable", "ema_validation")


def check_ema_settings(config) -> None:
    if not config.use_ema:
        changed = [name for name in EMA_OPTIONS if name in config.explicit]
        if changed:
            raise ConfigError(f"`--{changed[0]}` only applies with `--use_ema true`; add it or remove `--{changed[0]}`")


BIAS_PORTION_STRATEGIES = ("earlier", "later")

#: Options that only flow-matching families act on (they shape the sigma distribution).
FLOW_OPTIONS = ("flow_sigmoid_scale", "flow_use_uniform_schedule", "flow_use_beta_schedule", "flow_beta_schedule_alpha",
                "flow_beta_schedule_beta", "flow_schedule_shift", "flow_schedule_auto_shift",
                "flow_use_discrete_schedule", "flow_min_timestep_boundary", "flow_max_timestep_boundary",
                "flow_loss_weighting")
#: Options that shape a DDPM noise schedule or its integer timestep draws; flow matching ignores them.
DDPM_SCHEDULE_OPTIONS = ("timestep_bias_strategy", "timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end",
                         "timestep_bias_portion", "disable_segmented_timestep_sampling", "rescale_betas_zero_snr",
                         "training_scheduler_timestep_spacing", "inference_scheduler_timestep_spacing")


def _prediction_type(config) -> str:
    """The explicit prediction type, else the family's default."""
    return config.prediction_type or family_info(config.model_family).prediction_types[0]


def check_timestep_settings(config) -> None:
    """Timestep bias, noise schedule and diff2flow options."""
    strategy = config.timestep_bias_strategy
    biased = strategy not in (None, "none")
    if not biased and config.timestep_bias_multiplier is not None:
        raise ConfigError("`--timestep_bias_multiplier` only applies with `--timestep_bias_strategy earlier`, `later` "
                          "or `range`; add one or remove the multiplier")
    for name in ("timestep_bias_begin", "timestep_bias_end"):
        if getattr(config, name) is not None and strategy != "range":
            raise ConfigError(f"`--{name}` only applies to `--timestep_bias_strategy range` (got {strategy!r}); "
                              f"set the strategy to range or remove `--{name}`")
    if config.timestep_bias_portion is not None and strategy not in BIAS_PORTION_STRATEGIES:
        raise ConfigError(f"`--timestep_bias_portion` only applies to `--timestep_bias_strategy earlier` or `later` "
                          f"(got {strategy!r}); the range strategy uses `--timestep_bias_begin`/`--timestep_bias_end`")
    begin = config.timestep_bias_begin if config.timestep_bias_begin is not None else 0
    if config.timestep_bias_end is not None and begin >= config.timestep_bias_end:
        raise ConfigError(f"`--timestep_bias_begin` = {begin} must be smaller than `--timestep_bias_end` = "
                          f"{config.timestep_bias_end} (the range is begin <= t < end)")
    if config.diff2flow_loss and not config.diff2flow_enabled:
        raise ConfigError("`--diff2flow_loss` needs `--diff2flow_enabled true`; add it or remove `--diff2flow_loss`")
    if config.diff2flow_enabled:
        prediction_type = _prediction_type(config)
        if prediction_type == "flow_matching":
            raise ConfigError("`--diff2flow_enabled` bridges epsilon, v_prediction or sample models to the flow "
                              "target; this model already predicts flow_matching, so remove it")
        if config.diff2flow_loss:
            for name in ("snr_gamma", "use_soft_min_snr"):
                if getattr(config, name):
                    raise ConfigError(f"`--{name}` weights the native {prediction_type} loss and is not defined for "
                                      "`--diff2flow_loss`; remove one of them")
            if config.rescale_betas_zero_snr and prediction_type == "epsilon":
                raise ConfigError("`--diff2flow_loss` with epsilon prediction cannot recover the image at the pure-noise "
                                  "timestep that `--rescale_betas_zero_snr` creates; use `--prediction_type "
                                  "v_prediction` or drop `--rescale_betas_zero_snr`")


def check_flow_options(config) -> None:
    """Flow-matching options only for families that train flow matching, and consistent with each other."""
    info = family_info(config.model_family)
    defaults = {option.name: option.default for option in all_options()}
    changed = [name for name in FLOW_OPTIONS if getattr(config, name) != defaults[name]]
    if changed and "flow_matching" not in info.prediction_types:
        raise ConfigError(f"`--{changed[0]}` only applies to flow-matching model families; {info.name} trains "
                          f"{', '.join(info.prediction_types)}, so remove it")
    if _prediction_type(config) == "flow_matching":
        changed = [name for name in DDPM_SCHEDULE_OPTIONS if getattr(config, name) not in (defaults[name], None, "none")]
        if changed:
            raise ConfigError(f"`--{changed[0]}` shapes a DDPM noise schedule; {info.name} trains flow matching, "
                              "whose noise levels the `--flow_*` options shape. Remove it")
    if config.flow_use_uniform_schedule and config.flow_use_beta_schedule:
        raise ConfigError("`--flow_use_uniform_schedule` and `--flow_use_beta_schedule` conflict: pick one "
                          "distribution (neither means the sigmoid one)")
    if config.flow_schedule_auto_shift and config.flow_schedule_shift is not None:
        raise ConfigError("`--flow_schedule_shift` and `--flow_schedule_auto_shift` conflict: the automatic shift "
                          "replaces the fixed one; remove one of them")
    low, high = config.flow_min_timestep_boundary, config.flow_max_timestep_boundary
    if (low is not None or high is not None) and not config.flow_use_discrete_schedule:
        raise ConfigError("`--flow_min_timestep_boundary` / `--flow_max_timestep_boundary` select part of the "
                          "discrete flow schedule; add `--flow_use_discrete_schedule true` or remove them")
    if not 0 <= (low or 0.0) < (1.0 if high is None else high) <= 1:
        raise ConfigError(f"flow timestep boundaries must satisfy 0 <= min ({low}) < max ({high}) <= 1")
    if config.flow_use_discrete_schedule and (config.flow_use_uniform_schedule or config.flow_use_beta_schedule
                                              or config.flow_schedule_auto_shift):
        raise ConfigError("`--flow_use_discrete_schedule` draws from its own table; it conflicts with "
                          "`--flow_use_uniform_schedule`, `--flow_use_beta_schedule` and `--flow_schedule_auto_shift`")


def timestep_warnings(config) -> list[str]:
    warnings = []
    if config.timestep_bias_strategy not in (None, "none") and config.timestep_bias_multiplier in (None, 1, 1.0):
        warnings.append(f"`--timestep_bias_strategy {config.timestep_bias_strategy}` has no effect with "
                        "`--timestep_bias_multiplier` 1 (the default); set it above 1 to favour those timesteps")
    if config.rescale_betas_zero_snr:
        spacing = config.inference_scheduler_timestep_spacing or config.training_scheduler_timestep_spacing
        if _prediction_type(config) == "epsilon":
            warnings.append("`--rescale_betas_zero_snr` with epsilon prediction: the last timestep is pure noise, from "
                            "which an epsilon model cannot recover the image (sampling that starts there gives NaNs); "
                            "use `--prediction_type v_prediction`")
        elif spacing != "trailing":
            warnings.append("`--rescale_betas_zero_snr`: sampling should start at the pure-noise last timestep; set "
                            "`--inference_scheduler_timestep_spacing trailing`")
    if config.diff2flow_enabled and not config.diff2flow_loss:
        warnings.append("`--diff2flow_enabled` alone does not change training; add `--diff2flow_loss true` to train "
                        "against the flow target")
    return warnings


def check_optimizer_settings(config) -> None:
    """What can be known about the optimizer options without importing its package (or torch).

    Which keys ``--optimizer_config`` may hold, and whether the weights and device suit the
    optimizer, are checked when the optimizer is built (simpletuner.training.optim).
    """
    parse_optimizer_config(config.optimizer_config)
    entry = OPTIMIZERS.get(config.optimizer)
    if entry is not None and not entry.has_betas:
        for name in ("optimizer_beta1", "optimizer_beta2"):
            if getattr(config, name) is not None:
                raise ConfigError(f"`--{name}` does not apply to `--optimizer {config.optimizer}`, which has no "
                                  "betas; remove it")
    if config.prodigy_steps is not None:
        if config.optimizer != "prodigy":
            raise ConfigError(f"`--prodigy_steps` only applies to `--optimizer prodigy`, but `--optimizer "
                              f"{config.optimizer}` is set; remove one of them")
    if config.lr_scale_sqrt and not config.lr_scale:
        raise ConfigError("`--lr_scale_sqrt` only changes how `--lr_scale` scales the learning rate; add "
                          "`--lr_scale true` or remove `--lr_scale_sqrt`")
    if config.grad_clip_method is not None and not config.max_grad_norm:
        raise ConfigError(f"`--grad_clip_method {config.grad_clip_method}` has no effect while `--max_grad_norm` "
                          "is 0; set a limit or remove `--grad_clip_method`")


def optimizer_warnings(config) -> list[str]:
    warnings = []
    entry = OPTIMIZERS.get(config.optimizer)
    if entry is not None and entry.schedule_free and config.lr_scheduler not in ("constant", "constant_with_warmup"):
        warnings.append(f"`--optimizer {config.optimizer}` needs no decay schedule (it averages its iterates "
                        f"instead); `--lr_scheduler {config.lr_scheduler}` decays the rate on top of that. Use "
                        "`constant` or `constant_with_warmup`")
    if config.optimizer == "prodigy" and config.learning_rate is not None and config.learning_rate < 0.1:
        warnings.append(f"`--optimizer prodigy` estimates the step size itself and `--learning_rate` multiplies "
                        f"that estimate; {config.learning_rate:g} will barely move the weights. 1.0 is usual")
    return warnings


def check_run_length(config) -> None:
    """Each option's own range is declared in the table and checked when the value is parsed
    (:func:`simpletuner.options.values.check_number`); what is left is how options combine."""
    if not (config.max_train_steps or config.num_train_epochs):
        raise ConfigError("set `--max_train_steps` or `--num_train_epochs` to a positive number; both are 0")
    if config.resolution is None:
        raise ConfigError("`--resolution` is unset; give the training size (e.g. 1024, or 1.0 with "
                          "`--resolution_type area`)")
    if config.learning_rate is None:
        raise ConfigError("`--learning_rate` is unset; give the peak learning rate (e.g. 1e-4)")


def check_device_seeds(config) -> None:
    """``--seed_for_each_device`` gives process r the seed ``seed + r``; even the last of the most
    processes a launch may have must get a seed numpy accepts (at most MAX_SEED)."""
    highest = MAX_SEED - (MAX_PROCESSES - 1)
    if config.seed_for_each_device and config.seed is not None and config.seed > highest:
        raise ConfigError(f"`--seed` = {config.seed} must be at most {highest} with `--seed_for_each_device`: "
                          f"process r uses seed + r, and seeds end at {MAX_SEED}")


def folder_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be created or written into, or None when it can (or already is a folder).

    Checked before anything loads so that a path like ``/dev/null`` or an existing file fails here with
    one line, not as a FileExistsError traceback when the first checkpoint or log is written.
    """
    try:
        path = Path(folder).expanduser()
        if path.exists():
            return None if path.is_dir() else "exists and is not a folder"
        parent = next((p for p in path.parents if p.exists()), None)
    except (OSError, ValueError, RuntimeError) as error:  # too long for the OS, a NUL byte, an unknown ~user
        return f"cannot be used as a path ({getattr(error, 'strerror', None) or error})"
    if parent is not None and not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a folder"
    return None


def check_output_dir(config) -> None:
    if config.output_dir in (None, ""):
        return  # check_required names it
    problem = folder_problem(config.output_dir)
    if problem:
        raise ConfigError(f"`--output_dir` {show_value(config.output_dir)} {problem}; give a folder (it is created "
                          "when missing)")


def load_checked_dataset_plan(config):
    """The dataset list, read and checked once at start-up; the run passes this plan down (dry-run,
    trainer, memory planner) instead of each reading the file again."""
    if not config.data_backend_config:
        raise ConfigError("`--data_backend_config` is required: point it at your multidatabackend.json")
    if not names_a_file(config.data_backend_config):
        raise ConfigError(f"`--data_backend_config`: file {show_value(config.data_backend_config)} does not exist")
    from simpletuner.data.config import parse_dataset_plan
    from simpletuner.data.settings import check_global_data_options

    # load_json_file turns bytes that are not UTF-8, a repeated key and runaway nesting into one line
    # naming the file; then every dataset mistake surfaces before a model loads
    entries = load_json_file(config.data_backend_config)
    plan = parse_dataset_plan(entries, source=config.data_backend_config)
    check_global_data_options(config, plan)  # and every mistake the global data options make in it
    return plan


def check_validation_settings(config) -> None:
    from simpletuner.validation.resolutions import parse_resolutions

    try:
        parse_resolutions(config.validation_resolution, fallback_edge=64)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def collect_warnings(config) -> list[str]:
    """Settings that are legal but probably not what the user meant."""
    warnings = []
    if config.validation_step_interval and not (config.validation_prompt or config.validation_prompt_library
                                                or config.user_prompt_library):
        warnings.append("`--validation_step_interval` is set but `--validation_prompt` is empty: "
                        "no validation images will be made")
    if config.lr_scheduler == "constant" and config.lr_warmup_steps:
        warnings.append(f"`--lr_warmup_steps {config.lr_warmup_steps}` has no effect with `--lr_scheduler constant`; "
                        "use `constant_with_warmup` to ramp the learning rate up")
    warnings.extend(timestep_warnings(config))
    warnings.extend(eval_warnings(config))
    warnings.extend(optimizer_warnings(config))
    warnings.extend(deepfloyd_warnings(config))
    warnings.extend(flux_warnings(config))
    warnings.extend(quantization_warnings(config))
    warnings.extend(memory_warnings(config))
    warnings.extend(sdxl_warnings(config))
    warnings.extend(checkpoint_warnings(config))
    warnings.extend(distillation_warnings(config))
    warnings.extend(validation_option_warnings(config))
    return warnings


RULES: tuple[Callable, ...] = (
    check_required, check_unimplemented, check_family, check_family_options, *PRECISION_RULES, check_supported_values, check_conflicts,
    check_run_length, check_output_dir, check_device_seeds,
    check_loss_settings, check_ema_settings, check_optimizer_settings,
    check_timestep_settings, check_flow_options, *TRAINING_RULES, *CREPA_RULES, *UREPA_RULES, *ALIGNMENT_RULES, *SCHEDULED_SAMPLING_RULES, *CAUSAL_RULES, *DISTILLATION_RULES, *CONTROLNET_RULES, *TREAD_RULES, *ADAPTER_RULES, check_deepfloyd, check_flux, *LTX_RULES, *WAN_RULES, check_sdxl,
    *QUANTIZATION_RULES, *MEMORY_RULES, *DEEPSPEED_RULES, *DISTRIBUTED_RULES, *SEQUENCE_PARALLEL_RULES, *CHECKPOINT_RULES,
    check_validation_settings, *VALIDATION_RULES, *VIDEO_VALIDATION_RULES, *EVAL_RULES, *REPORTING_RULES, *PUBLISHING_RULES,
)


def validate_config(config):
    """Run every rule, then read and check the dataset list; raise on the first error.

    Returns ``(warnings, dataset plan)``.
    """
    for rule in (*RULES, load_checked_dataset_plan):
        try:
            plan = rule(config)
        except OSError as error:  # a rule looked up a path the OS refuses (a name too long, a loop of links)
            raise unusable_path_error(config, error) from None
    return collect_warnings(config), plan


def unusable_path_error(config, error: OSError) -> ConfigError:
    """The ConfigError for a path option whose value the operating system cannot even look up.

    Rules check many paths (models, caches, scripts, JSON files); rather than each guarding its own
    ``is_file()``, the failure is turned into one message here, naming the option whose value holds
    the path.
    """
    culprit = str(error.filename or "")
    names = sorted((name for name, value in config.as_dict().items()
                    if culprit and isinstance(value, str) and value and culprit.startswith(value.rstrip("/"))),
                   key=lambda name: -len(getattr(config, name)))  # the longest value that holds the path
    where = f"`--{names[0]}` {show_value(getattr(config, names[0]))}" if names else f"the path {show_value(culprit)}"
    return ConfigError(f"{where} cannot be used as a path ({error.strerror or error}); give a shorter or existing path")
