"""Asking a :class:`~simpletuner.configure.questions.Question` in the terminal, with questionary.

Each question is preceded by a comment-style line, ``# key: help``, so the user sees the name the
answer gets in config.json next to what it means (and tests can tell which question is on screen).
Under the prompt, a footer names the keys: Enter keeps the value shown, Esc goes back to the previous
question, Ctrl-O shows or hides the section's advanced questions. The footer disappears once the
question is answered, so the scrollback keeps only questions and answers. Ctrl-C is never
swallowed: it raises :class:`KeyboardInterrupt` for the command to report that nothing was written.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

from simpletuner.configure.navigation import GoBack, Navigation, ToggleAdvanced
from simpletuner.configure.questions import Question

#: prompt_toolkit's names of the navigation keys, and how the footer spells them.
BACK_KEY, BACK_LABEL = "escape", "Esc"
ADVANCED_KEY, ADVANCED_LABEL = "c-o", "Ctrl-O"
_BACK, _ADVANCED = object(), object()


class TerminalUI:
    """The wizard's only contact with the terminal."""

    def ask(self, question: Question, navigation: Navigation | None = None) -> Any:
        """Show the help, ask, and return the raw answer (the label, yes/no, or the text typed).

        Raises:
            GoBack: the user pressed the back key (only with ``navigation``).
            ToggleAdvanced: the user pressed the advanced-questions key (only with ``navigation``
                in a section).
        """
        import questionary

        self.explain(question.key, question.help)
        if question.kind == "select":
            prompt = questionary.select(question.key, choices=list(question.choices), default=question.default,
                                        use_search_filter=True, use_jk_keys=False,
                                        instruction="(arrow keys, or type to filter)")
        elif question.kind == "confirm":
            prompt = questionary.confirm(question.key, default=bool(question.default))
        else:
            extra: dict[str, Any] = {}
            if question.is_path:
                from prompt_toolkit.completion import PathCompleter

                # Tab completes; completing while typing would make Enter close the menu instead.
                extra = dict(completer=PathCompleter(expanduser=True), complete_while_typing=False)
            prompt = questionary.text(question.key, default=str(question.default), validate=question.check, **extra)
        if navigation is not None:
            _add_navigation(prompt.application, navigation)
        answer = prompt.unsafe_ask()
        if answer is _BACK:
            raise GoBack()
        if answer is _ADVANCED:
            raise ToggleAdvanced()
        return answer

    def explain(self, key: str, text: str) -> None:
        width = max(40, min(100, shutil.get_terminal_size((100, 24)).columns) - 2)
        lines = textwrap.wrap(f"{key}: {text}" if text else key, width=width - 4) or [key]
        print("\n# " + "\n#   ".join(lines), flush=True)

    def heading(self, title: str) -> None:
        print(f"\n== {title} ==", flush=True)

    def say(self, text: str) -> None:
        print(text, flush=True)


def footer_text(navigation: Navigation) -> str:
    """The keys line shown under a question."""
    parts = ["Enter: keep", f"{BACK_LABEL}: back" if navigation.can_go_back else ""]
    if navigation.advanced_shown is not None:
        parts.append(f"{ADVANCED_LABEL}: {'hide' if navigation.advanced_shown else 'show'} advanced questions")
    parts.append("Ctrl-C: quit, nothing written")
    return "  " + " · ".join(part for part in parts if part)


def _add_navigation(application: Any, navigation: Navigation) -> None:
    """Bind the navigation keys on a questionary prompt and put the keys line under it."""
    from prompt_toolkit.filters import IsDone
    from prompt_toolkit.key_binding import KeyBindings, merge_key_bindings
    from prompt_toolkit.layout import ConditionalContainer, HSplit, Layout, Window
    from prompt_toolkit.layout.controls import FormattedTextControl

    bindings = KeyBindings()

    # eager: fire on Esc alone instead of waiting to see whether it starts an Alt-key sequence
    @bindings.add(BACK_KEY, eager=True)
    def _back(event: Any) -> None:
        event.app.exit(result=_BACK)

    if navigation.advanced_shown is not None:
        @bindings.add(ADVANCED_KEY, eager=True)
        def _advanced(event: Any) -> None:
            event.app.exit(result=_ADVANCED)

    application.key_bindings = merge_key_bindings([application.key_bindings or KeyBindings(), bindings])
    footer = ConditionalContainer(Window(FormattedTextControl([("class:instruction", footer_text(navigation))]),
                                         height=1, dont_extend_height=True), filter=~IsDone())
    layout = application.layout
    application.layout = Layout(HSplit([layout.container, footer]), focused_element=layout.current_window)
