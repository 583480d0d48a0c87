"""Parsing ``--validation_resolution`` (kept torch-free: config validation uses it)."""

from __future__ import annotations


def parse_resolutions(text: str | None, fallback_edge: int) -> list[tuple[int, int]]:
    """``"512"``, ``"512x768"`` or a comma-separated list of those -> [(width, height), ...]."""
    if not text:
        return [(fallback_edge, fallback_edge)]
    sizes = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            if "x" in part:
                width, height = (int(v) for v in part.split("x", 1))
            else:
                width = height = int(float(part))
        except ValueError:
            raise ValueError(f"--validation_resolution: {part!r} is not WIDTH, or WIDTHxHEIGHT") from None
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise ValueError(f"--validation_resolution: {part!r} must be positive multiples of 8 (e.g. 512 or 512x768)")
        sizes.append((width, height))
    return sizes or [(fallback_edge, fallback_edge)]
