"""Asking a :class:`~simpletuner.configure.questions.Question` in the terminal, with questionary.

Each question is preceded by a comment-style line, ``# key: help``, so the user sees the name the
answer gets in config.json next to what it means (and tests can tell which question is on screen).
Ctrl-C is never swallowed: it raises :class:`KeyboardInterrupt` for the command to report that
nothing was written.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

from simpletuner.configure.questions import Question


class TerminalUI:
    """The wizard's only contact with the terminal."""

    def ask(self, question: Question) -> Any:
        """Show the help, ask, and return the converted answer."""
        import questionary

        self.explain(question.key, question.help)
        if question.kind == "select":
            prompt = questionary.select(question.key, choices=list(question.choices), default=question.default,
                                        use_search_filter=True, use_jk_keys=False)
        elif question.kind == "confirm":
            prompt = questionary.confirm(question.key, default=bool(question.default))
        else:
            extra: dict[str, Any] = {}
            if question.is_path:
                from prompt_toolkit.completion import PathCompleter

                # Tab completes; completing while typing would make Enter close the menu instead.
                extra = dict(completer=PathCompleter(expanduser=True), complete_while_typing=False)
            prompt = questionary.text(question.key, default=str(question.default), validate=question.check, **extra)
        return question.convert(prompt.unsafe_ask())

    def explain(self, key: str, text: str) -> None:
        width = max(40, min(100, shutil.get_terminal_size((100, 24)).columns) - 2)
        lines = textwrap.wrap(f"{key}: {text}" if text else key, width=width - 4) or [key]
        print("\n# " + "\n#   ".join(lines), flush=True)

    def heading(self, title: str) -> None:
        print(f"\n== {title} ==", flush=True)

    def say(self, text: str) -> None:
        print(text, flush=True)
