"""Config rules for Wan, checked before anything loads (torch-free, like every rule).

That the refiner options are only set for families that list them is checked generically. A Wan 2.2
A14B checkpoint holds two experts that split the noise levels at its boundary; ``--refiner_training``
picks one of them (the low-noise expert, or with ``--refiner_training_invert_schedule`` the high-noise
one) and without it a run trains both. The rules here refuse what would silently do nothing or write
a file no client loads.
"""

from __future__ import annotations

from simpletuner.models.registry import family_info
from simpletuner.options import ConfigError
from simpletuner.options.refiner_rules import check_refiner_split


def _expert_flavour(config) -> bool | None:
    """True/False when the flavour says whether the model has two experts; None when a model path
    without a flavour leaves it to the loaded checkpoint (checked when the model loads)."""
    info = family_info(config.model_family)
    if config.model_flavour is None and config.pretrained_model_name_or_path:
        return None
    return (config.model_flavour or info.default_flavour) in info.expert_flavours


def check_wan(config) -> None:
    if config.model_family != "wan":
        return
    check_refiner_split(config, "the share of the noise levels the low-noise expert takes (the checkpoint's "
                                "boundary, e.g. 0.875)", inverted_part="the high-noise expert")
    strength = config.refiner_training_strength
    if strength is not None and not config.refiner_training:
        raise ConfigError("`--refiner_training_strength` sets the boundary of the expert `--refiner_training` trains; "
                          "add `--refiner_training` or remove it")
    experts = _expert_flavour(config)
    info = family_info("wan")
    if config.refiner_training and experts is False:
        raise ConfigError(f"`--refiner_training` trains one expert of a two-expert Wan 2.2 model, but `--model_flavour "
                          f"{config.model_flavour or info.default_flavour}` has a single transformer; use "
                          f"{' or '.join(info.expert_flavours)} or remove it")
    if experts and not config.refiner_training and config.quantize_via == "pipeline" \
            and (config.base_model_precision or "no_change") != "no_change":
        raise ConfigError("`--quantize_via pipeline` quantizes the transformer while it loads, and without "
                          "`--refiner_training` this run trains both Wan 2.2 experts, of which the loader sees only the "
                          "first; use `--quantize_via cpu` (or accelerator), or train one expert with "
                          "`--refiner_training`")
    if experts and not config.refiner_training and (config.num_processes or 1) > 1:
        raise ConfigError(f"`--num_processes {config.num_processes}`: a run that trains both Wan 2.2 experts sends "
                          "each sample to one of them, so a step can leave one expert without gradients, which DDP "
                          "does not allow; train one expert per run (`--refiner_training`, with "
                          "`--refiner_training_invert_schedule` for the high-noise one) or use one process")
    if experts and not config.refiner_training and (config.lora_format or "diffusers") == "comfyui":
        raise ConfigError("`--lora_format comfyui` writes one model's LoRA per file, and without `--refiner_training` "
                          "this run trains both Wan 2.2 experts; train one expert per run (`--refiner_training`, with "
                          "`--refiner_training_invert_schedule` for the high-noise one) or use `--lora_format diffusers`")


WAN_RULES = (check_wan,)
