"""The options table and everything derived from it (parser, config loading, validation, docs).

Import cost matters here: ``simpletuner --help`` and config validation run through this package
and must never import torch, diffusers or transformers.
"""

from __future__ import annotations

import difflib
from functools import lru_cache

from simpletuner.options.spec import Option


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key, value and the fix."""


@lru_cache(maxsize=1)
def all_options() -> tuple[Option, ...]:
    """Every declared option, in table order."""
    from simpletuner.options.table import ALL_OPTIONS

    return tuple(ALL_OPTIONS)


@lru_cache(maxsize=1)
def options_by_name() -> dict[str, Option]:
    """Option lookup by canonical name."""
    return {option.name: option for option in all_options()}


@lru_cache(maxsize=1)
def alias_targets() -> dict[str, str]:
    """Deprecated alias -> canonical option name."""
    return {alias: option.name for option in all_options() for alias in option.aliases}


def closest_name(name: str) -> str | None:
    """The known option (or alias) spelled most like ``name``, for "did you mean" messages."""
    known = list(options_by_name()) + list(alias_targets())
    matches = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_option_message(name: str, source: str) -> str:
    """The error text for a key that no option declares."""
    from simpletuner.options.messages import shorten

    suggestion = closest_name(name)
    hint = f"; did you mean `{suggestion}`?" if suggestion else "; run `simpletuner options` to list every option"
    return f"{source}: unknown option `{shorten(name)}`{hint}"


__all__ = ["ConfigError", "Option", "all_options", "options_by_name", "alias_targets", "closest_name", "unknown_option_message"]
