"""``simpletuner configure``: write or edit config.json, multidatabackend.json and config.env.

The wizard owns no option knowledge of its own. Every question about an option takes its choices,
default and help from the options table (:mod:`simpletuner.options`), every dataset question from
the dataset key table (:mod:`simpletuner.data.schema`), and the finished files are checked by the same
validation that ``simpletuner train`` runs. That way a new option or a new rule reaches the wizard
without anyone editing it.

Modules, in the order the data flows:

- :mod:`~simpletuner.configure.draft`: the three files held in memory, keys spelled as in the file.
- :mod:`~simpletuner.configure.questions`: one :class:`~simpletuner.configure.questions.Question`
  per option or dataset key, derived from the table and the schema (no terminal code).
- :mod:`~simpletuner.configure.wizard` and :mod:`~simpletuner.configure.terminal`: the interactive
  sections, and asking a question in the terminal with questionary.
- :mod:`~simpletuner.configure.settings`: ``--set key=value`` for the non-interactive mode.
- :mod:`~simpletuner.configure.write`: validate everything, then replace the files atomically.
- :mod:`~simpletuner.configure.command`: the ``simpletuner configure`` command line.

Only the standard library and the options package are imported here; questionary is imported when
the interactive wizard starts, torch never.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str]) -> int:
    """Run ``simpletuner configure`` with ``argv`` (the arguments after the subcommand)."""
    from simpletuner.configure.command import run

    return run(argv)


__all__ = ["main"]
