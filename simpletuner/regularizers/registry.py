"""Regularizers by name, each with the condition under which a run uses it.

Built-in ones are ``"module:function"`` strings (nothing heavy is imported to list them); each builder
takes ``(model, config)``. :func:`register_regularizer` adds one at run time, with its own condition
(a plugin, or a test that brings a regularizer without editing the trainer).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class RegularizerEntry:
    name: str
    builder: str | Callable[[Any, Any], Any]
    enabled: Callable[[Any], bool]

    def build(self, model, config):
        if callable(self.builder):
            return self.builder(model, config)
        module_name, function = self.builder.split(":")
        return getattr(importlib.import_module(module_name), function)(model, config)


#: The regularizers simpletuner ships, in the order their terms are added.
BUILTIN_REGULARIZERS: tuple[RegularizerEntry, ...] = (
    RegularizerEntry("layersync", "simpletuner.regularizers.layersync:build", lambda config: bool(config.layersync_enabled)),
    RegularizerEntry("crepa", "simpletuner.regularizers.crepa:build", lambda config: bool(config.crepa_enabled)),
    RegularizerEntry("urepa", "simpletuner.regularizers.urepa:build", lambda config: bool(config.urepa_enabled)),
    RegularizerEntry("tread", "simpletuner.regularizers.tread:build", lambda config: bool(config.tread_config)),
)

_registered: dict[str, RegularizerEntry] = {}


def register_regularizer(name: str, builder: Callable[[Any, Any], Any], enabled: Callable[[Any], bool]) -> None:
    if any(entry.name == name for entry in BUILTIN_REGULARIZERS):
        raise ValueError(f"regularizer {name!r} is built in; register the new one under another name")
    _registered[name] = RegularizerEntry(name, builder, enabled)


def unregister_regularizer(name: str) -> None:
    _registered.pop(name, None)


def build_regularizers(model, config) -> list:
    """Every regularizer this config switches on, built for ``model``."""
    entries = [*BUILTIN_REGULARIZERS, *_registered.values()]
    return [entry.build(model, config) for entry in entries if entry.enabled(config)]
