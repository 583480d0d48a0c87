"""Turning raw values (CLI strings, JSON values, TOML values) into the typed value an option holds.

Every failure raises :class:`ConfigError` naming where the value came from, the key, the value and
the expected type, so the user can fix it without reading code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from simpletuner.options import ConfigError
from simpletuner.options.files import check_nesting, load_json_file, names_a_file, nesting_error
from simpletuner.options.messages import shorten, show_value
from simpletuner.options.spec import Option

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
#: String options a config file may also give as a list of lines (joined with newlines).
LINE_LIST_OPTIONS = ("modelspec_comment",)
#: String options whose value may name several of their choices, separated by commas (``tensorboard,wandb``),
#: or in a config file as a list of names; each name is checked against the choices, and the value is kept
#: as one string without blanks.
COMMA_SEPARATED_CHOICES = ("report_to",)
_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list": "a list (JSON list or comma-separated string)",
    "json": "a JSON object/list or a path to a JSON file",
}

#: The range every int option lives in unless it declares a narrower one: what torch and numpy hold.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _type_error(option: Option, value: Any, source: str) -> ConfigError:
    return ConfigError(
        f"{source}: `{option.name}` = {show_value(value)} is not {_KIND_WORDS[option.kind]}"
        + (f"; allowed values: {', '.join(map(str, option.choices))}" if option.choices else "")
    )


def range_requirement(option: Option) -> str | None:
    """The declared range of ``option`` as the end of a sentence ("must be at least 1"), or None."""
    low, high = option.minimum, option.maximum
    if low is None and high is None:
        return None
    if high is None:
        if option.exclusive_minimum:
            return "must be positive" if low == 0 else f"must be greater than {low}"
        return "must not be negative" if low == 0 else f"must be at least {low}"
    if low is None:
        return f"must be below {high}" if option.exclusive_maximum else f"must be at most {high}"
    if option.exclusive_minimum and option.exclusive_maximum:
        return f"must be between {low} and {high} (exclusive)"
    if option.exclusive_minimum:
        return f"must be in ({low}, {high}]"
    if option.exclusive_maximum:
        return f"must be at least {low} and below {high}"
    return f"must be between {low} and {high}"


def _in_range(option: Option, number: int | float) -> bool:
    low, high = option.minimum, option.maximum
    if low is not None and (number <= low if option.exclusive_minimum else number < low):
        return False
    if high is not None and (number >= high if option.exclusive_maximum else number > high):
        return False
    return True


def check_number(option: Option, number: int | float, raw: Any, source: str) -> None:
    """Reject a non-finite float, an int beyond 64 bits, or a number outside the option's declared range.

    The message starts like the hand-written rules ("`--lora_rank` = 0 must be at least 1") and ends
    with where the value came from.
    """
    exact = isinstance(number, int) and not isinstance(raw, float)  # 1e40 reads better than its 41 digits
    if exact or (isinstance(number, float) and math.isfinite(number)):
        shown = show_value(number)
    else:  # nan, inf, a 400-digit integer: as the user wrote it
        shown = shorten(raw.strip()) if isinstance(raw, str) else show_value(raw)
    where = f" ({source})"
    requirement = range_requirement(option)
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"`--{option.name}` = {shown} is not a finite number"
                          + (f"; it {requirement}" if requirement else "") + where)
    if not _in_range(option, number):
        raise ConfigError(f"`--{option.name}` = {shown} {requirement}{where}")
    if isinstance(number, int) and not INT64_MIN <= number <= INT64_MAX:
        raise ConfigError(f"`--{option.name}` = {shown} must be between {INT64_MIN} and {INT64_MAX} (a 64-bit "
                          f"integer){where}")


def parse_bool(value: Any) -> bool:
    """Accept booleans and the usual spellings of them; anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(value)


def _coerce_kind(option: Option, value: Any) -> Any:
    kind = option.kind
    if kind == "bool":
        return parse_bool(value)
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        return int(str(value).strip())
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            try:
                return float(value)
            except OverflowError:  # a 400-digit integer: too large for a float, reported as not finite
                return math.inf if value > 0 else -math.inf
        return float(value)
    if kind == "str":
        if isinstance(value, list) and option.name in LINE_LIST_OPTIONS and all(isinstance(v, str) for v in value):
            return "\n".join(value)
        if isinstance(value, list) and option.name in COMMA_SEPARATED_CHOICES and all(isinstance(v, str) for v in value):
            return ",".join(value)  # config.json's ["tensorboard", "wandb"] is tensorboard,wandb
        if isinstance(value, (dict, list, bool)):
            raise ValueError(value)
        return str(value)
    if kind == "list":
        if isinstance(value, (list, tuple)):
            return [str(v) if not isinstance(v, (int, float)) else v for v in value]
        text = str(value).strip()
        if text.startswith("["):
            parsed = _inline_json(option, text)
            if not isinstance(parsed, list):
                raise ValueError(value)
            return parsed
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "json":
        if isinstance(value, (dict, list)):
            return value
        text = str(value).strip()
        if text.startswith(("{", "[")):
            return _inline_json(option, text)
        return text  # a path to a JSON file; read where it is used, so errors can name the file
    raise AssertionError(kind)


def _inline_json(option: Option, text: str) -> Any:
    """JSON given as an option's value; nesting deeper than any real setting is refused before it can
    exhaust the interpreter's stack (json itself raises RecursionError on thousands of levels)."""
    try:
        parsed = json.loads(text)
    except RecursionError:
        raise nesting_error(f"`{option.name}`") from None
    check_nesting(parsed, f"`{option.name}`")
    return parsed


def coerce_value(option: Option, value: Any, source: str) -> Any:
    """The typed value for ``option`` from a raw ``value``; ``None`` stays ``None`` (unset)."""
    if value is None:
        return None
    if option.kind != "str" and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    try:
        typed = _coerce_kind(option, value)
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        raise _type_error(option, value, source) from None
    if option.kind in ("int", "float"):
        check_number(option, typed, value, source)
    if option.kind == "str" and "\0" in typed:
        raise ConfigError(f"{source}: `{option.name}` = {show_value(typed)} contains a NUL character, which no "
                          "path, name or prompt can hold; remove it")
    several = option.name in COMMA_SEPARATED_CHOICES and isinstance(typed, str)
    if several:
        names = list(dict.fromkeys(part.strip() for part in typed.split(",") if part.strip()))
        typed = ",".join(names) or typed
    if option.choices is not None and typed is not None:
        allowed = {str(c) for c in option.choices}
        values = typed if isinstance(typed, list) else typed.split(",") if several else [typed]
        for item in values:
            if str(item) not in allowed:
                raise ConfigError(
                    f"{source}: `{option.name}` = {show_value(item)} is not one of: "
                    f"{', '.join(map(str, option.choices))}"
                    + (" (several may be given, separated by commas)" if several else "")
                )
    return typed


def read_json_option(option_name: str, value: Any) -> Any:
    """The JSON content of a ``json`` option: inline value, or the parsed file it names."""
    if not isinstance(value, str):
        return value
    if not names_a_file(value):
        raise ConfigError(f"`{option_name}`: {show_value(value)} is neither inline JSON nor an existing JSON file")
    return load_json_file(Path(value).expanduser())
