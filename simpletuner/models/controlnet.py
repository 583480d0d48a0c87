"""Building the ControlNet that ``--controlnet`` trains, for any family that supports one.

A new ControlNet starts as a copy of the frozen denoiser's input half: its config is the one diffusers
derives from the denoiser (``ControlNetModel.from_unet`` for the UNet families, the transformer's own
config for SD3), with ``--controlnet_custom_config`` laid over it (fewer layers, another conditioning
embedding, ...). Every weight whose name and shape the denoiser also has is copied from it; the rest
(the conditioning embedding, the zero convolutions / zero linears that feed the residuals back) keeps
the zero initialisation diffusers gives it, so an untrained ControlNet leaves the denoiser's output
unchanged. ``--controlnet_model_name_or_path`` loads an existing ControlNet instead.

The family files only say how their denoiser is called with the residuals and which diffusers
pipeline samples with them (``ModelFamily.controlnet_*`` hooks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: The folder of the final output (and what ``ControlNetModel.from_pretrained`` is pointed at).
CONTROLNET_FOLDER = "controlnet"


def controlnet_model_class(family_info) -> type:
    """The diffusers class of the family's ControlNet (``FamilyInfo.controlnet_class``)."""
    import diffusers

    return getattr(diffusers, family_info.controlnet_class)


def unet_controlnet_layout(unet: torch.nn.Module, vae_scale_factor: int) -> dict[str, Any]:
    """The config diffusers' ``ControlNetModel.from_unet`` derives from ``unet``, with a conditioning
    embedding that halves the control image as often as the VAE halves the picture (one halving per
    channel step after the first: diffusers' default (16, 32, 96, 256) fits SD's 8x VAE, smaller VAEs
    need fewer steps)."""
    import math

    from diffusers import ControlNetModel

    layout = dict(ControlNetModel.from_unet(unet, load_weights_from_unet=False).config)
    halvings = int(math.log2(vae_scale_factor))
    channels = tuple(layout["conditioning_embedding_out_channels"])
    layout["conditioning_embedding_out_channels"] = channels[:halvings + 1]
    return layout


def copy_matching_weights(target: torch.nn.Module, source: torch.nn.Module) -> list[str]:
    """Copy every tensor of ``source`` whose name and shape ``target`` also has; returns the names
    copied. Names that differ in shape (e.g. the last SD3 block, which in the transformer computes no
    text output) keep ``target``'s initialisation."""
    wanted = target.state_dict()
    copied = {name: tensor for name, tensor in source.state_dict().items()
              if name in wanted and wanted[name].shape == tensor.shape}
    target.load_state_dict(copied, strict=False)
    return sorted(copied)


def new_controlnet(model_class: type, base_config: dict[str, Any], denoiser: torch.nn.Module,
                   overrides: dict[str, Any] | None, zero_init: tuple[str, ...] = ()) -> torch.nn.Module:
    """A ControlNet built from ``base_config`` with ``overrides`` on top, initialised from ``denoiser``.

    ``zero_init``: modules (by attribute name) zeroed after the copy, so the new branch starts silent
    where diffusers' own ``from_transformer`` zeroes them (SD3's control-input embedding).
    """
    config = {key: value for key, value in base_config.items() if not key.startswith("_")}
    accepted = set(_init_parameters(model_class))
    unknown = [key for key in (overrides or {}) if key not in accepted]
    if unknown:
        raise ValueError(f"--controlnet_custom_config: {model_class.__name__} has no setting {unknown[0]!r}; "
                         f"known settings: {', '.join(sorted(accepted))}")
    config.update(overrides or {})
    controlnet = model_class.from_config(config)
    copied = copy_matching_weights(controlnet, denoiser)
    for name in zero_init:
        for parameter in getattr(controlnet, name).parameters():
            torch.nn.init.zeros_(parameter)
    logger.info("new %s: %d tensors copied from the denoiser", model_class.__name__, len(copied))
    return controlnet


def _init_parameters(model_class: type) -> list[str]:
    import inspect

    return [name for name in inspect.signature(model_class.__init__).parameters if name != "self"]


def load_controlnet(model_class: type, source: str, revision: str | None = None) -> torch.nn.Module:
    """An existing ControlNet (a folder holding config.json and weights, or a hub id)."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file() and (path / CONTROLNET_FOLDER).is_dir():
        return model_class.from_pretrained(str(path / CONTROLNET_FOLDER))  # a run's output folder
    return model_class.from_pretrained(source, revision=revision)


def controlnet_for(model, config) -> torch.nn.Module:
    """The ControlNet of this run, in float32 (it is the trained network): loaded from
    ``--controlnet_model_name_or_path`` or initialised from the model's denoiser."""
    model_class = controlnet_model_class(model.info)
    if config.controlnet_model_name_or_path:
        controlnet = load_controlnet(model_class, config.controlnet_model_name_or_path, config.revision)
        logger.info("ControlNet loaded from %s", config.controlnet_model_name_or_path)
    else:
        controlnet = model.controlnet_from_denoiser(config.controlnet_custom_config or None)
    return controlnet.to(device=model.device, dtype=torch.float32)
