"""The catalogue of model families: what each supports, without importing torch.

Config validation runs before any model loads (and on the CLI's start-up path), so it needs to know
a family's flavours and capabilities without importing its implementation. Each family file reads
its own entry from here; nothing is declared twice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilyInfo:
    """Static facts about a model family.

    Attributes:
        name: the ``--model_family`` value.
        module: where the implementation (a :class:`~simpletuner.models.base.ModelFamily`) lives.
        class_name: the implementation class inside ``module``.
        flavours: ``--model_flavour`` name -> hub id (or a local folder) it stands for.
        default_flavour: used when no flavour and no model path is given.
        prediction_types: the targets this family can be trained on; the first is its default.
        model_types: ``full`` and/or ``lora``.
        text_encoders: the text encoders ``--train_text_encoder`` can train (empty: none).
    """

    name: str
    module: str
    class_name: str
    flavours: dict[str, str]
    default_flavour: str
    prediction_types: tuple[str, ...]
    model_types: tuple[str, ...] = ("full", "lora")
    text_encoders: tuple[str, ...] = ()
    notes: str = field(default="", compare=False)


FAMILIES: dict[str, FamilyInfo] = {
    "sd1x": FamilyInfo(
        name="sd1x",
        module="simpletuner.models.sd1x",
        class_name="StableDiffusion1x",
        flavours={
            "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "1.4": "CompVis/stable-diffusion-v1-4",
            "dreamshaper": "Lykon/dreamshaper-8",
            "realvis": "SG161222/Realistic_Vision_V6.0_B1_noVAE",
        },
        default_flavour="1.5",
        prediction_types=("epsilon", "v_prediction", "sample"),
        text_encoders=("text_encoder",),
    ),
    "sd2x": FamilyInfo(
        name="sd2x",
        module="simpletuner.models.sd1x",
        class_name="StableDiffusion2x",
        flavours={
            "2.1": "stabilityai/stable-diffusion-2-1",
            "2.0": "stabilityai/stable-diffusion-2",
            "2.1-base": "stabilityai/stable-diffusion-2-1-base",
            "2.0-base": "stabilityai/stable-diffusion-2-base",
        },
        default_flavour="2.1",
        prediction_types=("v_prediction", "epsilon", "sample"),
        text_encoders=("text_encoder",),
    ),
}


def family_info(name: str) -> FamilyInfo:
    """The catalogue entry for ``name``; an unknown or unimplemented family is a clear error."""
    if name not in FAMILIES:
        from simpletuner.options import ConfigError

        raise ConfigError(
            f"`--model_family {name}` is not supported yet; available families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


def load_family_class(name: str):
    """Import and return the implementation class of a family (this imports torch)."""
    info = family_info(name)
    return getattr(importlib.import_module(info.module), info.class_name)
