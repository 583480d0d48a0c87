"""The shape of one option declaration.

Every flag the trainer knows is declared exactly once as an :class:`Option`. The argparse parser,
config-file loading, validation, the wizard and ``documentation/OPTIONS.md`` are all derived from
these declarations, so adding a flag never means editing several places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The largest seed: numpy's generators take seeds 0 to 2**32 - 1, torch's more, so this fits both.
MAX_SEED = 2**32 - 1
#: The most training processes one launch may name (``--num_processes``, TRAINING_NUM_PROCESSES).
MAX_PROCESSES = 2**20

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
        aliases: other names for the option (older names, or another tool's, e.g. FastVideo's); they
            work and print a note naming the option they are read as.
        implemented: False while the trainer does not act on the option yet. Setting an
            unimplemented option to anything but its default is rejected at validation, so no
            accepted flag is silently ignored.
        required: the run cannot start without a value (from CLI or config).
        metavar: the placeholder shown in ``--help`` (defaults to the upper-cased name).
        minimum / maximum: the smallest / largest value an ``int`` or ``float`` option accepts
            (None: no bound of that side). Checked when the value is parsed, so a value outside
            the range never reaches a rule, the planner or the trainer.
        exclusive_minimum / exclusive_maximum: the bound itself is not allowed (``learning_rate``
            must be above 0, ``ema_decay`` below 1).

    Floats must also be finite (no nan or inf) and ints fit in 64 bits, whatever the range says:
    no option means anything by them, and torch and numpy cannot hold more.
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
    minimum: int | float | None = None
    maximum: int | float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def __post_init__(self) -> None:
        if self.kind not in VALUE_KINDS:
            raise ValueError(f"option {self.name!r}: unknown kind {self.kind!r}; use one of {VALUE_KINDS}")
        if self.name.startswith("-"):
            raise ValueError(f"option {self.name!r}: declare names without leading dashes")
        bounded = self.minimum is not None or self.maximum is not None
        if bounded and self.kind not in ("int", "float"):
            raise ValueError(f"option {self.name!r}: only int and float options take a minimum/maximum")
        if (self.exclusive_minimum and self.minimum is None) or (self.exclusive_maximum and self.maximum is None):
            raise ValueError(f"option {self.name!r}: an exclusive bound needs the bound itself")
        if self.minimum is not None and self.maximum is not None and self.minimum >= self.maximum:
            raise ValueError(f"option {self.name!r}: minimum {self.minimum} must be below maximum {self.maximum}")

    def range_text(self) -> str | None:
        """The declared range in short notation (``>= 1``, ``> 0``, ``[0, 1]``, ``(0, 1]``), or None.

        Shown by ``--help`` and OPTIONS.md; error messages word the same range in a sentence.
        """
        low, high = self.minimum, self.maximum
        if low is None and high is None:
            return None
        if high is None:
            return f"{'>' if self.exclusive_minimum else '>='} {low}"
        if low is None:
            return f"{'<' if self.exclusive_maximum else '<='} {high}"
        return f"{'(' if self.exclusive_minimum else '['}{low}, {high}{')' if self.exclusive_maximum else ']'}"
