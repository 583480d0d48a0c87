"""DeepSpeed ZeRO through accelerate: our options -> the DeepSpeed config accelerate's plugin gets.

``--zero_stage`` alone is enough; ``--deepspeed_config`` (inline JSON or a file) adds what the options
do not cover (offloading, bucket sizes). One rule keeps the two from disagreeing silently: whatever
simpletuner already has an option for comes from that option, and the DeepSpeed config may leave it
out, write ``"auto"``, or repeat the same value; a different value is refused, naming both.

What the options give DeepSpeed, and why:

* ``train_micro_batch_size_per_gpu`` = ``--train_batch_size``; the trainer does not hand its data
  loader to accelerate, so accelerate cannot read the batch size from one.
  ``train_batch_size`` stays ``"auto"``: accelerate multiplies in the process count it launched with.
* ``gradient_accumulation_steps`` = ``--gradient_accumulation_steps``.
* ``gradient_clipping`` = ``--max_grad_norm`` (0 switches clipping off, as it does without DeepSpeed).
  DeepSpeed clips by norm only, so ``--grad_clip_method value`` is refused by the rules.
* ``bf16`` / ``fp16`` ``enabled`` from ``--mixed_precision``; fp16 uses DeepSpeed's dynamic loss
  scale (``loss_scale`` 0).
* ``zero_optimization.stage`` = ``--zero_stage`` (default 2 with only a DeepSpeed config that lacks it).
* ``zero_allow_untested_optimizer`` = true: the optimizer is always the one ``--optimizer`` builds
  (torch-optimi, bitsandbytes, torchao...), never DeepSpeed's own, and DeepSpeed refuses any optimizer
  it does not ship unless told. With optimizer offload, ``zero_force_ds_cpu_optimizer`` = false lets
  that optimizer step on the CPU copy instead of demanding DeepSpeed's CPU Adam.

``optimizer`` and ``scheduler`` sections are refused: they would replace ``--optimizer`` and
``--lr_scheduler`` behind the trainer's back. This module is torch-free and never imports deepspeed;
:func:`deepspeed_plugin` imports accelerate only when a run starts.
"""

from __future__ import annotations

import copy
from typing import Any

#: What ``--zero_stage`` defaults to when only ``--deepspeed_config`` is given and it names no stage.
DEFAULT_STAGE = 2
#: Sections of a DeepSpeed config that would take over what simpletuner builds itself.
REFUSED_SECTIONS = {
    "optimizer": "--optimizer builds the optimizer (DeepSpeed's own would replace it and its options)",
    "scheduler": "--lr_scheduler builds the learning-rate schedule, stepped by the trainer",
}
INSTALL_HINT = "pip install 'simpletuner[deepspeed]'"
#: ``zero_optimization`` sizes accelerate can only fill from a transformers model's ``hidden_size``, which
#: diffusers' denoisers do not have: "auto" there would stop the run at start-up.
NO_AUTO_SIZES = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config and the options disagree; the message names the key, both values and the fix."""


def uses_deepspeed(config) -> bool:
    """True when either ZeRO option is set."""
    return config.zero_stage is not None or config.deepspeed_config not in (None, "", {})


def user_deepspeed_config(config) -> dict[str, Any]:
    """``--deepspeed_config`` as a dict (``{}`` when unset), read from the file it names if it is a path."""
    from simpletuner.options.values import read_json_option

    value = config.deepspeed_config
    if value in (None, "", {}):
        return {}
    parsed = read_json_option("deepspeed_config", value)
    if not isinstance(parsed, dict):
        raise DeepSpeedConfigError(f"`--deepspeed_config` must be a JSON object (DeepSpeed's config), got "
                                   f"{type(parsed).__name__}")
    return copy.deepcopy(parsed)


def _decided_by_options(config, stage: int) -> dict[str, Any]:
    """DeepSpeed keys (dotted for nested ones) that simpletuner's options decide; the DeepSpeed config
    may only leave them out, write "auto" or repeat the value."""
    return {
        "train_micro_batch_size_per_gpu": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": float(config.max_grad_norm or 0.0),
        "zero_optimization.stage": stage,
        "bf16.enabled": config.mixed_precision == "bf16",
        "fp16.enabled": config.mixed_precision == "fp16",
    }


#: The option behind each key of :func:`_decided_by_options`, for messages.
_OPTION_FOR = {
    "train_micro_batch_size_per_gpu": "--train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "gradient_clipping": "--max_grad_norm", "zero_optimization.stage": "--zero_stage",
    "bf16.enabled": "--mixed_precision", "fp16.enabled": "--mixed_precision",
}


def _required(offloads_optimizer: bool) -> dict[str, Any]:
    """Keys without which DeepSpeed would refuse simpletuner's own optimizer; always set."""
    required = {"zero_allow_untested_optimizer": True}
    if offloads_optimizer:
        required["zero_force_ds_cpu_optimizer"] = False
    return required


def _defaults(config) -> dict[str, Any]:
    """Keys filled in only when the DeepSpeed config leaves them out: fp16's dynamic loss scale."""
    return {"fp16.loss_scale": 0} if config.mixed_precision == "fp16" else {}


def _node(config: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The dict holding ``dotted``'s last part, created on the way down."""
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DeepSpeedConfigError(f"`--deepspeed_config`: {part!r} must be an object, got {child!r}")
        node = child
    return node, last


def _requested_stage(config, given: dict[str, Any]) -> int:
    zero = given.get("zero_optimization")
    in_file = zero.get("stage") if isinstance(zero, dict) else None
    if in_file not in (None, "auto") and (not isinstance(in_file, int) or not 0 <= in_file <= 3):
        raise DeepSpeedConfigError(f"`--deepspeed_config`: zero_optimization.stage must be 0, 1, 2 or 3, "
                                   f"got {in_file!r}")
    if config.zero_stage is not None:
        return config.zero_stage
    return in_file if in_file not in (None, "auto") else DEFAULT_STAGE


def _offloads_optimizer(given: dict[str, Any]) -> bool:
    zero = given.get("zero_optimization")
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return isinstance(offload, dict) and str(offload.get("device", "none")).lower() not in ("none", "")


def deepspeed_config_for(config) -> dict[str, Any]:
    """The DeepSpeed config accelerate gets for ``config``: ``--deepspeed_config`` (if any) with every key
    the options decide filled in. Raises DeepSpeedConfigError on a refused section or a disagreement."""
    given = user_deepspeed_config(config)
    for section, reason in REFUSED_SECTIONS.items():
        if section in given:
            raise DeepSpeedConfigError(f"`--deepspeed_config` has a {section!r} section; remove it: {reason}")
    zero = given.get("zero_optimization")
    for key in NO_AUTO_SIZES:
        if isinstance(zero, dict) and zero.get(key) == "auto":
            raise DeepSpeedConfigError(
                f"`--deepspeed_config`: zero_optimization.{key} = \"auto\" cannot be filled in: accelerate derives it "
                "from a transformers model's hidden_size, which diffusion models do not have. Give a number (e.g. "
                "50000000) or leave the key out for DeepSpeed's default (`simpletuner plan-memory` shows what it costs)")
    merged = copy.deepcopy(given)
    for dotted, value in _decided_by_options(config, _requested_stage(config, given)).items():
        node, key = _node(merged, dotted)
        present = node.get(key, "auto")
        if present != "auto" and present != value:
            option = _OPTION_FOR[dotted]
            raise DeepSpeedConfigError(
                f"`--deepspeed_config` sets {dotted} = {present!r}, but {option} gives {value!r}; set it in one place: "
                f"remove {dotted} from the DeepSpeed config (or write \"auto\"), or change {option}")
        node[key] = value
    for dotted, value in _required(_offloads_optimizer(given)).items():
        node, key = _node(merged, dotted)
        node[key] = value
    for dotted, value in _defaults(config).items():
        node, key = _node(merged, dotted)
        node.setdefault(key, value)
    merged.setdefault("train_batch_size", "auto")
    return merged


def deepspeed_installed() -> bool:
    """Whether the deepspeed package can be imported here (found without importing it: that is slow
    and, without a CUDA toolkit, noisy)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def zero_stage_of(config) -> int | None:
    """The ZeRO stage the run trains with, or None without DeepSpeed."""
    if not uses_deepspeed(config):
        return None
    return _requested_stage(config, user_deepspeed_config(config))


def deepspeed_plugin(config):
    """accelerate's DeepSpeedPlugin for ``config``, or None when the ZeRO options are unset.

    ZeRO-3's partition-at-load (``zero3_init_flag``) is off: the denoiser is loaded by diffusers before
    it meets DeepSpeed, which partitions it when the model is prepared. Under stage 3 the full 16-bit
    weights are gathered for saving (``zero3_save_16bit_model``).
    """
    if not uses_deepspeed(config):
        return None
    if not deepspeed_installed():
        raise ImportError(f"--zero_stage / --deepspeed_config need the deepspeed package: {INSTALL_HINT}")
    from accelerate.utils import DeepSpeedPlugin

    settings = deepspeed_config_for(config)
    return DeepSpeedPlugin(hf_ds_config=settings, zero3_init_flag=False,
                           zero3_save_16bit_model=settings["zero_optimization"]["stage"] == 3)
