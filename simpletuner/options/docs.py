"""Generate ``documentation/OPTIONS.md`` from the options table.

The file is derived, never edited by hand: ``simpletuner options --write-docs`` rewrites it and a test
fails when the committed copy differs from what the table produces.
"""

from __future__ import annotations

from pathlib import Path

from simpletuner.options import all_options
from simpletuner.options.spec import Option

HEADER = """# Options

This file is generated from the options table (`simpletuner/options/table/`) by
`simpletuner options --write-docs`. Do not edit it by hand.

Every option can be given on the command line (`--name value`), or as a key in `config/config.json`
or `config/config.toml` (with or without the leading `--`). Command-line flags win over the config
file, which wins over the defaults below. Boolean options accept `true`/`false`; a bare `--flag` means
`true`.

The **allowed** column lists an option's choices, or the range its number must lie in: `>= 1` means
1 or more, `> 0` above zero, `[0, 1]` from 0 to 1 with both ends allowed, `(0, 1]` above 0 up to and
including 1. A value outside the range, and `nan` or `inf` for any number, stops the run before
anything loads, with a message naming the option, the value and the range.

Options marked **not yet** are declared so that configs written for other trainers are understood,
but the trainer does not act on them yet: setting one to anything but its default stops the run at
validation with a message saying so.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default_text(option: Option) -> str:
    if option.default is None or option.default == "":
        return "—"
    return f"`{option.default}`"


def option_row(option: Option) -> str:
    name = f"`--{option.name}`" + "".join(f"<br>(alias `--{a}`, deprecated)" for a in option.aliases)
    kind = option.kind + (" (required)" if option.required else "")
    choices = ", ".join(f"`{c}`" for c in option.choices) if option.choices else ""
    if option.range_text():
        choices = f"`{option.range_text()}`"
    status = "yes" if option.implemented else "not yet"
    return f"| {name} | {kind} | {_default_text(option)} | {_cell(choices)} | {status} | {_cell(option.help)} |"


def render_options_markdown() -> str:
    """The full text of OPTIONS.md."""
    lines = [HEADER]
    groups: dict[str, list[Option]] = {}
    for option in all_options():
        groups.setdefault(option.group, []).append(option)
    implemented = sum(o.implemented for o in all_options())
    lines.append(f"{len(all_options())} options, {implemented} implemented.\n")
    lines.append("Groups: " + ", ".join(f"[{g}](#{g})" for g in groups) + "\n")
    for group, options in groups.items():
        lines.append(f"## {group}\n")
        lines.append("| option | type | default | allowed | implemented | what it does |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        lines.extend(option_row(o) for o in options)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def default_docs_path() -> Path:
    return Path(__file__).resolve().parents[2] / "documentation" / "OPTIONS.md"


def write_options_markdown(path: Path | None = None) -> Path:
    path = path or default_docs_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_options_markdown(), encoding="utf-8")
    return path
