"""A wizard UI driven by a script, shared by the wizard tests (tests/test_configure*.py).

The wizard talks to its terminal only through ``ask`` / ``heading`` / ``say``; answering from a dict
lets a test walk every section without a terminal and then check which questions were asked.
"""

from __future__ import annotations

from typing import Any

from simpletuner.configure.navigation import Navigation
from simpletuner.configure.questions import Question


class ScriptedUI:
    """Answers each question with a given answer (by question key) or its default; records the questions."""

    def __init__(self, answers: dict[str, Any] | None = None):
        self.answers = answers or {}
        self.questions: list[Question] = []

    def ask(self, question: Question, navigation: Navigation | None = None) -> Any:
        self.questions.append(question)
        return self.answers.get(question.key, question.default)

    def heading(self, title: str) -> None:
        pass

    def say(self, text: str) -> None:
        pass

    @property
    def keys(self) -> list[str]:
        """The keys of the questions asked, in order."""
        return [question.key for question in self.questions]
