"""Going back and showing the advanced questions: the wizard replays its answers.

The wizard's sections are plain code that asks one question after another, and which question comes
next depends on the answers before it (a LoRA asks for a rank, full training does not). Rather than
teach every section to undo itself, going back works by replaying: the session keeps the answers in
order; to go back one question, the draft is reset to where the wizard started and the sections run
again, silently taking the recorded answers, until the question before the current one, which is
asked again with its answer as the default. A branching question answered differently this time
leads to its own follow-up questions; every answer given before stays the default of its question.
Switching the advanced questions on (or off) replays the same way, so an advanced question the
sections now ask is the first one shown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

from simpletuner.configure.machine import Machine, detect_machine
from simpletuner.configure.questions import Question
from simpletuner.options import ConfigError


class GoBack(Exception):
    """Raised by a terminal when the user asks for the previous question."""


class ToggleAdvanced(Exception):
    """Raised by a terminal when the user switches the advanced questions on or off."""


@dataclass(frozen=True)
class Navigation:
    """What the footer under a question offers: going back, and the advanced questions' state
    (None: the question is not part of a section, so the key does nothing there)."""

    can_go_back: bool = True
    advanced_shown: bool | None = None


class UI(Protocol):
    """What the wizard needs from a terminal (see :class:`~simpletuner.configure.terminal.TerminalUI`).

    ``ask`` returns the raw answer (the label picked, yes/no, or the text typed), and may raise
    :class:`GoBack` or :class:`ToggleAdvanced` when ``navigation`` is given.
    """

    def ask(self, question: Question, navigation: Navigation | None = None) -> Any: ...
    def heading(self, title: str) -> None: ...
    def say(self, text: str) -> None: ...


@dataclass(frozen=True)
class Answer:
    """One answered question: its key, which time that key was asked in this walk, the raw answer."""

    key: str
    occurrence: int
    raw: Any


@dataclass
class WizardSession:
    """What outlives one walk through the sections: the answers in order, every answer ever given
    (the defaults when a question is asked again), which sections show their advanced questions,
    the draft's content when the wizard started (``start``, what each walk begins from), and the
    machine (detected once, when a question first depends on it; tests give ``machine_override``)."""

    answers: list[Answer] = field(default_factory=list)
    remembered: dict[tuple[str, int], Any] = field(default_factory=dict)
    advanced_sections: set[str] = field(default_factory=set)
    start: Any = None
    machine_override: Machine | None = None
    _machine: Machine | None = None

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            self._machine = self.machine_override or detect_machine()
        return self._machine

    def toggle_advanced(self, section: str, sections: list[str]) -> bool:
        """Show (or hide) the advanced questions of ``section`` and the sections after it; return
        whether they are now shown."""
        later = sections[sections.index(section):] if section in sections else [section]
        show = section not in self.advanced_sections
        if show:
            self.advanced_sections.update(later)
        else:
            self.advanced_sections.difference_update(later)
        return show

    def start_over(self, draft_snapshot: Any) -> None:
        """Ask every question again from ``draft_snapshot`` (after a failed validation); the answers
        given stay the defaults."""
        self.answers.clear()
        self.start = draft_snapshot

    def go_back(self) -> bool:
        """Forget the last answer (it stays the default); False when there is none."""
        if not self.answers:
            return False
        self.answers.pop()
        return True


class Walk:
    """One pass through the sections: replays the session's answers, then asks the terminal.

    Sections call :meth:`ask`, :meth:`heading` and :meth:`say` as they would on a terminal. While
    recorded answers remain and the sections ask the same questions in the same order, the answers
    are taken silently; from the first question that differs (or is new) on, questions go to the
    terminal, with the section heading printed first and the last answer given as the default.
    """

    def __init__(self, ui: UI, session: WizardSession):
        self.ui = ui
        self.session = session
        self.position = 0
        self.section = ""
        self.counts: dict[str, int] = {}
        self.shown_heading: str | None = None

    @property
    def replaying(self) -> bool:
        return self.position < len(self.session.answers)

    def heading(self, title: str) -> None:
        self.section = title
        self.shown_heading = None

    def say(self, text: str) -> None:
        if not self.replaying:
            self.ui.say(text)

    def advanced(self) -> bool:
        return self.section in self.session.advanced_sections

    def ask(self, question: Question) -> Any:
        """The converted answer to ``question``: the recorded one while replaying, else the terminal's."""
        occurrence = self.counts.get(question.key, 0)
        self.counts[question.key] = occurrence + 1
        if self.replaying:
            recorded = self.session.answers[self.position]
            if (recorded.key, recorded.occurrence) == (question.key, occurrence):
                try:
                    value = question.convert(recorded.raw)
                except ConfigError:
                    pass  # e.g. the folder named then is gone: ask again
                else:
                    self.position += 1
                    return value
            del self.session.answers[self.position:]  # the walk took another way from here
        return self._ask_terminal(question, occurrence)

    def _ask_terminal(self, question: Question, occurrence: int) -> Any:
        if self.shown_heading != self.section and self.section:
            self.ui.heading(self.section)
            self.shown_heading = self.section
        slot, computed = (question.key, occurrence), question.default
        remembered = self.session.remembered.get(slot)
        if remembered is not None and _acceptable_default(question, remembered):
            question = dataclasses.replace(question, default=remembered)
        navigation = Navigation(can_go_back=bool(self.session.answers),
                                advanced_shown=self.advanced() if self.section else None)
        raw = self.ui.ask(question, navigation)
        value = question.convert(raw)  # the terminal checked it as it was typed
        self.session.answers.append(Answer(question.key, occurrence, raw))
        # Only a changed answer is kept as the default: one that took the default follows the answers
        # before it (a resolution accepted for flux becomes sd1x's 512 after going back to pick sd1x).
        if raw == computed:
            self.session.remembered.pop(slot, None)
        else:
            self.session.remembered[slot] = raw
        self.position += 1
        return value


def _acceptable_default(question: Question, raw: Any) -> bool:
    if question.kind == "select":
        return raw in question.choices
    if question.kind == "confirm":
        return isinstance(raw, bool)
    return isinstance(raw, str)
