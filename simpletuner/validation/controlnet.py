"""Validation of a ``--controlnet`` or ``--control`` run: the family's diffusers ControlNet pipeline (or,
for ``--control``, the control pipeline the family builds itself), given a control image.

The control image is the conditioning file of the first training image (in path order) of the first
dataset paired with a ``controlnet`` conditioning dataset: the same picture every validation, so the
images of successive steps can be compared. The pipeline resizes it to each validation resolution.
The runner calls :func:`controlnet_validation` after building its usual pipeline; without a
ControlNet it changes nothing.
"""

from __future__ import annotations

import io
import logging
from typing import Any

logger = logging.getLogger(__name__)


def first_control_image(data):
    """The first control image of the run's datasets as an RGB PIL image, or None when no dataset has one."""
    from PIL import Image

    for role in data.roles.values():
        for conditioning in role.conditioning:
            if conditioning.is_mask or not conditioning.pairs:
                continue
            key = conditioning.pairs[min(conditioning.pairs, key=str)]
            local = conditioning.images.local_path(key)
            source = local if local is not None else io.BytesIO(conditioning.images.read_bytes(key))
            with Image.open(source) as image:
                logger.info("validation control image: %s of conditioning dataset %s", key, conditioning.id)
                return image.convert("RGB")
    return None


def attach_validation_image(model, data) -> None:
    """Remember the run's validation control image on the model, next to its ControlNet."""
    model.controlnet_validation_image = first_control_image(data)


def controlnet_validation(model, pipeline, denoiser=None, channel_control: bool = False) -> tuple[Any, dict[str, Any]]:
    """``(pipeline, extra call arguments)``: the family's ControlNet pipeline and its control image when
    the model trains a ControlNet; ``pipeline`` (already the family's control pipeline) and the control
    image with ``--control``; else ``pipeline`` unchanged and no arguments."""
    controlnet = getattr(model, "controlnet", None)
    if controlnet is None and not channel_control:
        return pipeline, {}
    image = getattr(model, "controlnet_validation_image", None)
    if image is None:
        raise ValueError("validation needs a control image, and no dataset of this run has a paired controlnet "
                         "conditioning image")
    if controlnet is not None:
        pipeline = model.controlnet_pipeline(controlnet, denoiser)
    return pipeline, {model.controlnet_image_argument(): image}
