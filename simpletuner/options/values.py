"""Turning raw values (CLI strings, JSON values, TOML values) into the typed value an option holds.

Every failure raises :class:`ConfigError` naming where the value came from, the key, the value and
the expected type, so the user can fix it without reading code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simpletuner.options import ConfigError
from simpletuner.options.spec import Option

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
#: String options a config file may also give as a list of lines (joined with newlines).
LINE_LIST_OPTIONS = ("modelspec_comment",)
_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list": "a list (JSON list or comma-separated string)",
    "json": "a JSON object/list or a path to a JSON file",
}


def _type_error(option: Option, value: Any, source: str) -> ConfigError:
    return ConfigError(
        f"{source}: `{option.name}` = {value!r} is not {_KIND_WORDS[option.kind]}"
        + (f"; allowed values: {', '.join(map(str, option.choices))}" if option.choices else "")
    )


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
        return float(value)
    if kind == "str":
        if isinstance(value, list) and option.name in LINE_LIST_OPTIONS and all(isinstance(v, str) for v in value):
            return "\n".join(value)
        if isinstance(value, (dict, list, bool)):
            raise ValueError(value)
        return str(value)
    if kind == "list":
        if isinstance(value, (list, tuple)):
            return [str(v) if not isinstance(v, (int, float)) else v for v in value]
        text = str(value).strip()
        if text.startswith("["):
            parsed = json.loads(text)
            if not isinstance(parsed, list):
                raise ValueError(value)
            return parsed
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "json":
        if isinstance(value, (dict, list)):
            return value
        text = str(value).strip()
        if text.startswith(("{", "[")):
            return json.loads(text)
        return text  # a path to a JSON file; read where it is used, so errors can name the file
    raise AssertionError(kind)


def coerce_value(option: Option, value: Any, source: str) -> Any:
    """The typed value for ``option`` from a raw ``value``; ``None`` stays ``None`` (unset)."""
    if value is None:
        return None
    if option.kind != "str" and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    try:
        typed = _coerce_kind(option, value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise _type_error(option, value, source) from None
    if option.choices is not None and typed is not None:
        allowed = {str(c) for c in option.choices}
        values = typed if isinstance(typed, list) else [typed]
        for item in values:
            if str(item) not in allowed:
                raise ConfigError(
                    f"{source}: `{option.name}` = {item!r} is not one of: {', '.join(map(str, option.choices))}"
                )
    return typed


def read_json_option(option_name: str, value: Any) -> Any:
    """The JSON content of a ``json`` option: inline value, or the parsed file it names."""
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"`{option_name}`: {value!r} is neither inline JSON nor an existing JSON file")
    from simpletuner.options.files import load_json_file

    return load_json_file(path)
