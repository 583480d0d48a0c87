"""Config rules for DeepFloyd IF, checked before anything loads (torch-free, like every rule).

IF differs from the latent families in ways a config can get wrong: it has no VAE, diffusers has no
single-file loader for it, its T5 conditioning is at most 77 tokens, each stage is trained at one
size (64 px for stage I, 256 px for stage II), and stage II needs a low-resolution input image that
validation cannot provide yet.
"""

from __future__ import annotations

import json
from pathlib import Path

from simpletuner.options import ConfigError

#: IF's pipelines always encode 77 T5 tokens, and its UNets were trained on that many.
DEEPFLOYD_MAX_TOKENS = 77


def flavour_stage(flavour: str) -> int:
    """1 or 2: ``ii-*`` flavours are the super-resolution stage."""
    return 2 if flavour.startswith("ii-") else 1


def native_edge(config, stage: int) -> int:
    """The edge in pixels ``stage`` generates, from the registry's DeepFloyd sizes (``FamilyInfo``), so the
    sizes live in one place. The chosen flavour's size when it is of that stage; otherwise (a local
    stage-II folder under a stage-I flavour) the size of the registry's first flavour of that stage."""
    from simpletuner.models.registry import FAMILIES

    info = FAMILIES["deepfloyd"]
    flavour = config.model_flavour
    if not flavour or flavour not in info.flavours or flavour_stage(flavour) != stage:
        flavour = next(name for name in info.flavours if flavour_stage(name) == stage)
    return info.resolution_for(flavour)


def deepfloyd_stage(config) -> int:
    """1 or 2: from a local model folder's pipeline class when there is one, else from the flavour
    (``ii-*`` flavours are the super-resolution stage)."""
    if config.pretrained_model_name_or_path:
        index = Path(str(config.pretrained_model_name_or_path)) / "model_index.json"
        if index.is_file():
            pipeline_class = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
            return 2 if "SuperResolution" in pipeline_class else 1
    return flavour_stage(str(config.model_flavour or ""))


def check_deepfloyd(config) -> None:
    if config.model_family != "deepfloyd":
        return
    if config.pretrained_vae_model_name_or_path:
        raise ConfigError("`--pretrained_vae_model_name_or_path` does not apply to deepfloyd: DeepFloyd IF denoises "
                          "pixels and has no VAE; remove it")
    if str(config.pretrained_model_name_or_path or "").endswith((".safetensors", ".ckpt")):
        raise ConfigError(f"`--pretrained_model_name_or_path {config.pretrained_model_name_or_path}`: diffusers cannot "
                          "load DeepFloyd IF from a single file; use a diffusers folder or hub id")
    length = config.tokenizer_max_length
    if length is not None and length > DEEPFLOYD_MAX_TOKENS:
        raise ConfigError(f"`--tokenizer_max_length` = {length}: DeepFloyd IF reads at most {DEEPFLOYD_MAX_TOKENS} T5 "
                          f"tokens (its pipelines always encode {DEEPFLOYD_MAX_TOKENS}); use {DEEPFLOYD_MAX_TOKENS} or less")
    if deepfloyd_stage(config) == 2 and config.validation_prompt and not config.validation_disable:
        raise ConfigError("`--validation_prompt` with DeepFloyd stage II: the super-resolution stage upscales a "
                          "low-resolution image, and validation has no image to give it yet; remove "
                          "`--validation_prompt` (the trained weights load in IFSuperResolutionPipeline)")


def deepfloyd_warnings(config) -> list[str]:
    """A global resolution far from what the stage was trained at is legal but probably a mistake:
    in pixel space it also makes every step much more expensive."""
    if config.model_family != "deepfloyd":
        return []
    from simpletuner.data.buckets import pixel_edge

    stage = deepfloyd_stage(config)
    native = native_edge(config, stage)
    edge = pixel_edge(config.resolution, config.resolution_type)
    if round(edge) != native:
        return [f"`--resolution` {config.resolution:g} ({config.resolution_type}): DeepFloyd stage {'I' * stage} "
                f"generates {native} px images and trains best at that size (`--resolution "
                f"{native} --resolution_type pixel`)"]
    return []
