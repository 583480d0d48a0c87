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
#: The size each stage generates.
NATIVE_EDGE = {1: 64, 2: 256}


def deepfloyd_stage(config) -> int:
    """1 or 2: from a local model folder's pipeline class when there is one, else from the flavour
    (``ii-*`` flavours are the super-resolution stage)."""
    if config.pretrained_model_name_or_path:
        index = Path(str(config.pretrained_model_name_or_path)) / "model_index.json"
        if index.is_file():
            pipeline_class = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
            return 2 if "SuperResolution" in pipeline_class else 1
    return 2 if str(config.model_flavour or "").startswith("ii-") else 1


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
    edge = pixel_edge(config.resolution, config.resolution_type)
    if round(edge) != NATIVE_EDGE[stage]:
        return [f"`--resolution` {config.resolution:g} ({config.resolution_type}): DeepFloyd stage {'I' * stage} "
                f"generates {NATIVE_EDGE[stage]} px images and trains best at that size (`--resolution "
                f"{NATIVE_EDGE[stage]} --resolution_type pixel`)"]
    return []
