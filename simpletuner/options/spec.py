"""The shape of one option declaration.

Every flag the trainer knows is declared exactly once as an :class:`Option`. The argparse parser,
config-file loading, validation, the wizard and ``documentation/OPTIONS.md`` are all derived from
these declarations, so adding a flag never means editing several places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Value kinds an option can hold. ``list`` accepts a JSON list or a comma-separated string;
#: ``json`` accepts a dict/list (from a config file) or a string holding JSON or a path to a JSON file.
VALUE_KINDS = ("str", "int", "float", "bool", "list", "json")


@dataclass(frozen=True)
class Option:
    """One command-line / config-file option.

    Attributes:
        name: the flag name without leading dashes (``learning_rate``).
        kind: one of :data:`VALUE_KINDS`.
        default: the value used when neither the CLI nor a config file sets it.
        help: one or two sentences in plain words; shown by ``--help`` and in OPTIONS.md.
        group: the section the option belongs to (``model``, ``training``, ``data``, ...).
        choices: the allowed values, when the option is an enumeration.
        aliases: deprecated names that still work but print a warning.
        implemented: False while the trainer does not act on the option yet. Setting an
            unimplemented option to anything but its default is rejected at validation, so no
            accepted flag is silently ignored.
        required: the run cannot start without a value (from CLI or config).
        metavar: the placeholder shown in ``--help`` (defaults to the upper-cased name).
    """

    name: str
    kind: str
    default: Any
    help: str
    group: str
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    implemented: bool = False
    required: bool = False
    metavar: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in VALUE_KINDS:
            raise ValueError(f"option {self.name!r}: unknown kind {self.kind!r}; use one of {VALUE_KINDS}")
        if self.name.startswith("-"):
            raise ValueError(f"option {self.name!r}: declare names without leading dashes")
