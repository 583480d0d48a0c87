"""Regularizers by name, each with the condition under which a run uses it.

Built-in ones are ``"module:function"`` strings (nothing heavy is imported to list them); each builder
takes ``(model, config)``. :func:`register_regularizer` adds one at run time, with its own condition
(a plugin, or a test that brings a regularizer without editing the trainer).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


def _call(target: str | Callable[[Any, Any], Any], model, config):
    if callable(target):
        return target(model, config)
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)(model, config)


@dataclass(frozen=True)
class RegularizerEntry:
    """``features``, when given, lists the per-image encoders whose outputs the regularizer reads from
    the batch; the data layer caches them beside the latents (see :func:`cached_features`)."""

    name: str
    builder: str | Callable[[Any, Any], Any]
    enabled: Callable[[Any], bool]
    features: str | Callable[[Any, Any], list] | None = None

    def build(self, model, config):
        return _call(self.builder, model, config)


#: The regularizers simpletuner ships, in the order their terms are added.
BUILTIN_REGULARIZERS: tuple[RegularizerEntry, ...] = (
    RegularizerEntry("layersync", "simpletuner.regularizers.layersync:build", lambda config: bool(config.layersync_enabled)),
    RegularizerEntry("crepa", "simpletuner.regularizers.crepa:build", lambda config: bool(config.crepa_enabled),
                     features="simpletuner.regularizers.crepa:teacher_features"),
    RegularizerEntry("urepa", "simpletuner.regularizers.urepa:build", lambda config: bool(config.urepa_enabled),
                     features="simpletuner.regularizers.urepa:teacher_features"),
    RegularizerEntry("tread", "simpletuner.regularizers.tread:build", lambda config: bool(config.tread_config)),
    RegularizerEntry("load_balancing", "simpletuner.regularizers.load_balancing:build",
                     lambda config: bool(config.hidream_use_load_balancing_loss)),
)

_registered: dict[str, RegularizerEntry] = {}


def register_regularizer(name: str, builder: Callable[[Any, Any], Any], enabled: Callable[[Any], bool],
                         features: Callable[[Any, Any], list] | None = None) -> None:
    if any(entry.name == name for entry in BUILTIN_REGULARIZERS):
        raise ValueError(f"regularizer {name!r} is built in; register the new one under another name")
    _registered[name] = RegularizerEntry(name, builder, enabled, features)


def unregister_regularizer(name: str) -> None:
    _registered.pop(name, None)


def build_regularizers(model, config) -> list:
    """Every regularizer this config switches on, built for ``model``."""
    entries = [*BUILTIN_REGULARIZERS, *_registered.values()]
    return [entry.build(model, config) for entry in entries if entry.enabled(config)]


def cached_features(model, config) -> list:
    """The per-image encoders the data layer should cache for this run's regularizers (one per batch
    key: CREPA and U-REPA with the same teacher share it); none with ``--alignment_teacher_features live``."""
    if config.alignment_teacher_features != "cached":
        return []
    entries = [*BUILTIN_REGULARIZERS, *_registered.values()]
    wanted = {}
    for entry in entries:
        if entry.features is not None and entry.enabled(config):
            for encoder in _call(entry.features, model, config):
                wanted.setdefault(encoder.batch_key, encoder)
    return list(wanted.values())
