"""Validation rules for ``--tread_config`` (TREAD token routing, simpletuner/regularizers/tread.py).
Torch-free, like every rule, so a mistake surfaces before a model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

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


def route_ranges(routes: list[dict], blocks: int | None) -> list[tuple[int, int]] | None:
    """Each route's (start, end) block range, 0-based; None when a negative index needs the block
    count and the denoiser's config is not on disk."""
    if blocks is not None:
        return [(r["start_layer_idx"] % blocks, r["end_layer_idx"] % blocks) for r in routes]
    if any(r["start_layer_idx"] < 0 or r["end_layer_idx"] < 0 for r in routes):
        return None
    return [(r["start_layer_idx"], r["end_layer_idx"]) for r in routes]


def route_of(block: int, ranges: list[tuple[int, int]]) -> int | None:
    return next((number for number, (start, end) in enumerate(ranges) if start <= block <= end), None)


class ComparedBlock(NamedTuple):
    option: str   # the option that names the block
    value: int    # as the user wrote it
    block: int    # 0-based block index


def compared_blocks(config) -> list[tuple[ComparedBlock, ComparedBlock]]:
    """The pairs of blocks whose tokens a regularizer compares token by token."""
    pairs = []
    student = config.layersync_student_block
    if config.layersync_enabled and student is not None:
        teacher = student if config.layersync_teacher_block is None else config.layersync_teacher_block
        # LayerSync counts depth from 1; 0 names the first block (simpletuner/regularizers/layersync.py)
        pairs.append((ComparedBlock("layersync_student_block", student, max(student - 1, 0)),
                      ComparedBlock("layersync_teacher_block", teacher, max(teacher - 1, 0))))
    block = config.crepa_block_index
    if config.crepa_enabled and config.crepa_use_backbone_features and block is not None:
        teacher = block if config.crepa_teacher_block_index is None else config.crepa_teacher_block_index
        pairs.append((ComparedBlock("crepa_block_index", block, block),
                      ComparedBlock("crepa_teacher_block_index", teacher, teacher)))
    return pairs


def check_compared_blocks(config, ranges: list[tuple[int, int]]) -> None:
    """LayerSync and CREPA with backbone features compare two blocks token by token: blocks outside every
    route or inside the same one compare the kept tokens, but two routes keep different random tokens."""
    for first, second in compared_blocks(config):
        routes = route_of(first.block, ranges), route_of(second.block, ranges)
        if None in routes or routes[0] == routes[1]:
            continue
        where = [f"route {number} (blocks {ranges[number][0]}..{ranges[number][1]})" for number in routes]
        raise ConfigError(f"`--{first.option}` {first.value} is inside `--tread_config` {where[0]} and "
                          f"`--{second.option}` {second.value} inside {where[1]}: the two routes keep different random "
                          "tokens, so the blocks share no tokens to compare; move one block outside every route, or "
                          "both into the same route")


def check_tread(config) -> None:
    """The routes' shape and ranges, and the block pairs a regularizer cannot compare under routing."""
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
    ranges = route_ranges(value["routes"], blocks)
    if ranges is not None:  # else checked when the first training step compares the blocks
        check_compared_blocks(config, ranges)


TREAD_RULES: tuple[Callable, ...] = (check_tread,)
