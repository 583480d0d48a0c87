"""How error messages show the values users gave.

A message must stay one readable line even when the value is a 100 KB string, a 400-digit number or
a huge nested object, so every message that echoes a user's value goes through :func:`show_value`.
Only the standard library is imported: every module of the options package may use this one.
"""

from __future__ import annotations

import math
from typing import Any

#: How much of a value a message shows.
SHOWN_CHARACTERS = 80


def show_value(value: Any, limit: int = SHOWN_CHARACTERS) -> str:
    """``value`` as a message shows it: ``repr`` for strings and containers, plain text for numbers,
    and for a long one only the first ``limit`` characters plus how long it was."""
    if isinstance(value, (bool, int, float)):
        try:
            text = str(value)
        except ValueError:  # an int with more digits than Python prints
            return f"<an integer of about {int(value.bit_length() * math.log10(2))} digits>"
    else:
        try:
            text = repr(value)
        except (ValueError, RecursionError):
            return f"<a {type(value).__name__} too large to show>"
    if len(text) <= limit + 20:  # cutting off fewer than 20 characters saves nothing
        return text
    length = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}… ({length} characters)"


def shorten(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """A key, name or path as written (no quotes added), cut like :func:`show_value` when long."""
    if len(text) <= limit + 20:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def one_line(message: str, limit: int = 2000) -> str:
    """``message`` on one line and at most about ``limit`` characters: the last guard before a message
    reaches the terminal. Characters that are not printable (newlines, form feeds, escape sequences
    an echoed value may hold) are written as escapes, so they can neither break the line nor drive
    the terminal."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (message cut; {len(text)} characters)"
