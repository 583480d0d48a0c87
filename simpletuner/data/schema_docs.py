"""Generate the key tables of ``documentation/DATASETS.md`` from the dataset key table.

The rest of DATASETS.md is written by hand; each key table sits between two marker comments,
``<!-- dataset-keys: NAME ... -->`` and ``<!-- /dataset-keys: NAME -->``, and is derived, never
edited: ``simpletuner options --write-docs`` rewrites the tables (with OPTIONS.md) and a test fails
when the committed copy differs from what :data:`simpletuner.data.schema.DATASET_KEYS` produces.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from simpletuner.data.schema import DATASET_KEYS, IMAGE_LIKE_TYPES, DatasetKey
from simpletuner.options.docs import rewrite_generated_parts

_TYPE_WORDS = {
    "str": "string", "optional_str": "string", "float": "number", "number": "number", "int": "integer",
    "optional_int": "integer", "bool": "bool", "optional_bool": "bool", "number_list": "list of numbers",
    "object": "object", "filter_list": "list or path", "word_list": "string or list", "id_list": "id or list of ids",
}

#: Table name -> which keys it lists.
_TABLES: dict[str, Callable[[DatasetKey], bool]] = {
    "image": lambda key: key.section == "" and bool(set(key.applies_to) & set(IMAGE_LIKE_TYPES))
    and key.backends != ("aws",),
    "text_embeds": lambda key: key.section == "" and "text_embeds" in key.applies_to,
    "aws": lambda key: key.section == "" and key.backends == ("aws",),
    "parquet": lambda key: key.section == "parquet",
    "huggingface": lambda key: key.section == "huggingface",
    "video": lambda key: key.section == "video",
}
#: The tables with an "applies to" column: those whose keys differ in where they are accepted.
_WITH_SCOPE = ("image",)

_BLOCK = re.compile(r"(<!-- dataset-keys: (?P<name>\w+)\b[^\n]*-->\n)(?P<body>.*?)(<!-- /dataset-keys: (?P=name) -->)",
                    re.DOTALL)


def table_names() -> tuple[str, ...]:
    return tuple(_TABLES)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def default_text(key: DatasetKey) -> str:
    """The default as DATASETS.md words it: ``required``, a value, the global option it inherits, a note."""
    if key.required:
        return "required"
    if key.default_note:
        return key.default_note
    if key.default is None or key.default == ():
        return f"`--{key.inherits}`" if key.inherits else "none"
    return _value(key.default) + (f" (or `--{key.inherits}`)" if key.inherits else "")


def allowed_text(key: DatasetKey) -> str:
    """The choices or the range; for a list, what each element may be."""
    each = "each " if key.kind in ("number_list", "word_list") else ""
    if key.choices:
        return each + ", ".join(f"`{choice}`" for choice in key.choices)
    if key.range_text():
        return f"{each}`{key.range_text()}`"
    return ""


def scope_text(key: DatasetKey) -> str:
    """Which dataset types (and storage backends) take the key."""
    types = [t for t in IMAGE_LIKE_TYPES if t in key.applies_to]
    text = "all" if len(types) == len(IMAGE_LIKE_TYPES) else ", ".join(f"`{t}`" for t in types)
    if key.backends:
        text += " (with " + " or ".join(f"`{backend}`" for backend in key.backends) + ")"
    return text


def render_key_table(name: str) -> str:
    """The markdown table ``name`` (one of :func:`table_names`)."""
    scoped = name in _WITH_SCOPE
    header = ["key", "type", "default", "allowed", *(["applies to"] if scoped else []), "meaning"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key in DATASET_KEYS:
        if not _TABLES[name](key):
            continue
        cells = [f"`{key.name}`" + "".join(f"<br>(or `{alias}`)" for alias in key.aliases), _TYPE_WORDS[key.kind],
                 default_text(key), allowed_text(key), *([scope_text(key)] if scoped else []), key.help]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def render_datasets_markdown(text: str) -> str:
    """``text`` (DATASETS.md) with every key table between its markers regenerated.

    Raises:
        ValueError: a marker names no known table, or a known table has no markers in ``text``.
    """
    found: list[str] = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in _TABLES:
            raise ValueError(f"DATASETS.md: unknown dataset key table {name!r}; known: {list(_TABLES)}")
        found.append(name)
        return match.group(1) + render_key_table(name) + match.group(4)

    rendered = _BLOCK.sub(replace, text)
    missing = [name for name in _TABLES if name not in found]
    if missing:
        raise ValueError(f"DATASETS.md has no markers for the key tables {missing}; add "
                         f"'<!-- dataset-keys: NAME -->' and '<!-- /dataset-keys: NAME -->' lines for each")
    return rendered


def default_datasets_docs_path() -> Path:
    return Path(__file__).resolve().parents[2] / "documentation" / "DATASETS.md"


def write_datasets_markdown(path: Path | None = None) -> Path:
    """Regenerate the key tables of DATASETS.md in place; the hand-written text is kept."""
    return rewrite_generated_parts(path or default_datasets_docs_path(), render_datasets_markdown)
