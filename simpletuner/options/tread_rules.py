"""Validation rules for ``--tread_config`` (TREAD token routing, simpletuner/regularizers/tread.py).
Torch-free, like every rule, so a mistake surfaces before a model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from simpletuner.options import ConfigError

EXAMPLE = '{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}'
ROUTE_KEYS = ("selection_ratio", "start_layer_idx", "end_layer_idx")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def local_block_count(config) -> int | None:
    """How many transformer blocks the denoiser has, when its config.json is on disk (else None: the
    range is then checked when TREAD attaches to the loaded model)."""
    root = Path(str(config.pretrained_model_name_or_path or "")).expanduser()
    for candidate in (root / "transformer" / "config.json", root / "config.json"):
        try:
            settings = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(settings.get("num_layers"), int):
            return settings["num_layers"] + int(settings.get("num_single_layers") or 0)
    return None


def check_route(number: int, route, blocks: int | None) -> None:
    where = f"`--tread_config` route {number}"
    if not isinstance(route, dict) or sorted(route) != sorted(ROUTE_KEYS):
        raise ConfigError(f"{where} must be an object with exactly the keys {', '.join(ROUTE_KEYS)}; e.g. {EXAMPLE}")
    ratio = route["selection_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"{where}: selection_ratio {ratio!r} must be a number in [0, 1) (the share of image "
                          "tokens that skips the range)")
    start, end = route["start_layer_idx"], route["end_layer_idx"]
    if not (_is_int(start) and _is_int(end)):
        raise ConfigError(f"{where}: start_layer_idx and end_layer_idx must be whole block indices, got "
                          f"{start!r} and {end!r}")
    if blocks is not None:
        for key, index in (("start_layer_idx", start), ("end_layer_idx", end)):
            if not -blocks <= index < blocks:
                raise ConfigError(f"{where}: {key} {index} is outside the denoiser's {blocks} transformer blocks; "
                                  f"use 0..{blocks - 1}, or -{blocks}..-1 counted from the end")
        start, end = start % blocks, end % blocks
        if start > end:
            raise ConfigError(f"{where}: start_layer_idx {route['start_layer_idx']} comes after end_layer_idx "
                              f"{route['end_layer_idx']}; the range runs from start to end")
    elif (start < 0) == (end < 0) and start > end:
        raise ConfigError(f"{where}: start_layer_idx {start} comes after end_layer_idx {end}; the range runs from "
                          "start to end")


def check_tread(config) -> None:
    """The routes' shape and ranges, and the combinations TREAD cannot run with."""
    value = config.tread_config
    if not value:
        return
    if isinstance(value, str):
        raise ConfigError(f"`--tread_config` {value!r} is neither inline JSON nor an existing JSON file; give e.g. "
                          f"'{EXAMPLE}'")
    if not isinstance(value, dict) or set(value) != {"routes"} or not isinstance(value["routes"], list) \
            or not value["routes"]:
        raise ConfigError(f'`--tread_config` must be an object with one key, "routes", a non-empty list; e.g. {EXAMPLE}')
    blocks = local_block_count(config)
    for number, route in enumerate(value["routes"]):
        check_route(number, route, blocks)
    if blocks is not None:
        ranges = sorted((r["start_layer_idx"] % blocks, r["end_layer_idx"] % blocks) for r in value["routes"])
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            if start <= end:
                raise ConfigError("`--tread_config` routes overlap; give each route its own block range")
    if config.gradient_checkpointing:
        raise ConfigError("`--tread_config` cannot be combined with `--gradient_checkpointing` yet: the recomputed "
                          "blocks would not see the same routed tokens; remove one of them")
    if config.layersync_enabled:
        raise ConfigError("`--tread_config` cannot be combined with `--layersync_enabled` yet: LayerSync would compare "
                          "blocks that see different token sets; remove one of them")

    if config.crepa_enabled:
        raise ConfigError("`--tread_config` cannot be combined with `--crepa_enabled` yet: CREPA would align a block "
                          "that sees only the kept tokens; remove one of them")


TREAD_RULES: tuple[Callable, ...] = (check_tread,)
