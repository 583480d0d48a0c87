"""Byte sizes as people write them ("24GiB", "16 GB", "8000MiB"), torch-free."""

from __future__ import annotations

import re

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text``: a number with an optional unit (B, KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB or
    K/M/G/T = powers of 1024). A bare number is bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = SIZE.match(str(text))
    unit = (match.group(2) if match else "").lower() or "b"
    if not match or unit not in UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 24GiB, 16GB or 8000MiB")
    value = float(match.group(1)) * UNITS[unit]
    if value <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return int(value)


def format_size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps the number at least 1 (``1.50 GiB``)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
