"""A real :class:`TrainConfig` for tests, built from the options table.

Tests that hand code a stand-in config (a ``SimpleNamespace`` with the few attributes they think the
code reads) drift from the table: the code then needs ``getattr(config, name, default)`` to survive the
missing attributes, and those defaults silently disagree with the table's. :func:`make_config` gives
every test the same object a run gets, so the code can read ``config.<option>`` and a misspelt option
fails loudly in tests as it does in training.

Imports only the options package: no torch, so config-only tests stay fast.
"""

from __future__ import annotations

from typing import Any

from simpletuner.options import alias_targets, options_by_name, unknown_option_message
from simpletuner.options.resolve import TrainConfig


def table_defaults() -> dict[str, Any]:
    """Every declared option at its table default."""
    return {name: option.default for name, option in options_by_name().items()}


def _check_known(names: list[str]) -> None:
    """Refuse a keyword that names no option, the way a config file would (closest name suggested)."""
    table = options_by_name()
    for name in names:
        if name in table:
            continue
        canonical = alias_targets().get(name)
        if canonical is not None:
            raise TypeError(f"make_config: `{name}` is a deprecated alias; use `{canonical}`")
        raise TypeError(unknown_option_message(name, "make_config"))


def make_config(**overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` holding the table defaults with ``overrides`` applied.

    ``explicit`` is exactly the overridden names, as if the user had set those options and no other:
    code that asks "did the user choose this?" (optimizer presets, run length) sees what a run would.

    Values are taken as given, not parsed: a test may hand the code a value the parser would refuse
    (an unregistered optimizer name, an out-of-range number) to check the code's own guard.

    Raises:
        TypeError: a keyword that is not a declared option; the message names the closest one.
    """
    _check_known(list(overrides))
    return TrainConfig({**table_defaults(), **overrides}, frozenset(overrides))


__all__ = ["make_config", "table_defaults"]
