"""Training methods by name: ``--training_method`` picks one, ``sft`` unless told otherwise.

Built-in methods are listed as ``"module:function"`` strings, so reading the list imports nothing
heavy; each builder takes ``(model, config)`` and returns a :class:`~simpletuner.methods.base.TrainingMethod`.
:func:`register_method` adds one at run time (a plugin, or a test that brings its own method without
editing the trainer). The options table declares the same built-in names as ``--training_method``'s
choices; a test keeps the two lists equal.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

#: The methods simpletuner ships, name -> builder.
BUILTIN_METHODS: dict[str, str] = {
    "sft": "simpletuner.methods.sft:build",
    "causal_sft": "simpletuner.methods.causal_sft:build",
    "dmd2": "simpletuner.methods.distillation.score_distillation:build_dmd2",
    "f_distill": "simpletuner.methods.distillation.score_distillation:build_f_distill",
    "ladd": "simpletuner.methods.distillation.score_distillation:build_ladd",
    "lcm": "simpletuner.methods.distillation.lcm:build",
    "causvid": "simpletuner.methods.distillation.causal_distillation:build_causvid",
    "self_forcing": "simpletuner.methods.distillation.causal_distillation:build_self_forcing",
}

_registered: dict[str, Callable[[Any, Any], Any]] = {}


def register_method(name: str, builder: Callable[[Any, Any], Any]) -> None:
    """Make ``builder(model, config)`` available as ``--training_method name``."""
    if name in BUILTIN_METHODS:
        raise ValueError(f"training method {name!r} is built in; register the new one under another name")
    _registered[name] = builder


def unregister_method(name: str) -> None:
    _registered.pop(name, None)


def method_names() -> list[str]:
    return [*BUILTIN_METHODS, *_registered]


def method_of(config) -> str:
    """The method a config asks for: ``--training_method``, or spec 002's ``--distillation_method``
    (``dmd`` is DMD2, ``lcm`` LCM; the config rules refuse the names that cannot be built)."""
    from simpletuner.methods.distillation.settings import DISTILLATION_METHOD_ALIASES

    if config.distillation_method:
        return DISTILLATION_METHOD_ALIASES[config.distillation_method]
    return config.training_method


def build_method(name: str, model, config):
    """The method ``name`` for this run's model and config. ``--controlnet`` runs SFT through a trained
    ControlNet (simpletuner/methods/controlnet.py) in place of plain SFT."""
    if name == "sft" and config.controlnet:
        from simpletuner.methods.controlnet import build as build_controlnet

        return build_controlnet(model, config)
    if name in _registered:
        return _registered[name](model, config)
    if name not in BUILTIN_METHODS:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(method_names())}")
    module_name, function = BUILTIN_METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), function)(model, config)
