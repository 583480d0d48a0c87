"""Check an :class:`ImportedConfig` against our own option table and dataset schema, then write
``config.json``, ``multidatabackend.json``, ``user_prompt_library.json`` (when the source had
sample prompts) and ``import-report.md`` into one folder.

Values are checked before anything is written: an option value our table refuses moves to the
unmapped list with the table's own message (so the files written always parse), and a dataset
entry the schema refuses stops the import naming the source file. After writing, the same
validation ``simpletuner train`` runs is tried on the written files; what it still objects to
(typically a model or image folder that lives on another machine) is reported, not hidden.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simpletuner.importers.common import ImportConfigError, ImportedConfig, Unmapped
from simpletuner.options import ConfigError

CONFIG_NAME = "config.json"
DATASETS_NAME = "multidatabackend.json"
PROMPTS_NAME = "user_prompt_library.json"
REPORT_NAME = "import-report.md"


@dataclass
class WrittenImport:
    """What an import wrote, and what ``simpletuner train`` validation says about it."""

    config_path: Path
    datasets_path: Path
    prompts_path: Path | None
    report_path: Path
    report: str
    #: the message ``simpletuner train`` validation stops at, or None when the files pass it
    validation_problem: str | None


def write_import(imported: ImportedConfig, source: Path, output_dir: Path, overwrite: bool = False) -> WrittenImport:
    """Check, then write the import into ``output_dir`` (created when missing)."""
    paths = {name: output_dir / name for name in (CONFIG_NAME, DATASETS_NAME, PROMPTS_NAME, REPORT_NAME)}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise ImportConfigError(f"{existing[0]} already exists; choose another --output-dir or pass --overwrite")
    datasets = [*imported.datasets, _text_embeds_entry(imported)]
    _check_datasets(datasets, source)
    options = dict(imported.options)
    options["data_backend_config"] = str(paths[DATASETS_NAME])
    prompts_path = None
    if imported.prompts:
        prompts_path = paths[PROMPTS_NAME]
        options["user_prompt_library"] = str(prompts_path)
    options = _checked_options(options, imported)
    output_dir.mkdir(parents=True, exist_ok=True)
    if prompts_path is not None:
        _write_json(prompts_path, _prompt_library(imported))
    _write_json(paths[DATASETS_NAME], datasets)
    _write_json(paths[CONFIG_NAME], options)
    problem = validation_problem(paths[CONFIG_NAME])
    report = render_report(imported, source, problem)
    paths[REPORT_NAME].write_text(report, encoding="utf-8")
    return WrittenImport(paths[CONFIG_NAME], paths[DATASETS_NAME], prompts_path, paths[REPORT_NAME], report, problem)


def _text_embeds_entry(imported: ImportedConfig) -> dict[str, Any]:
    cache = imported.options.get("cache_dir", "cache")
    return {"id": "text-embeds", "dataset_type": "text_embeds", "type": "local", "cache_dir": f"{cache}/text",
            "default": True}


def _check_datasets(datasets: list[dict[str, Any]], source: Path) -> None:
    """Every entry against the dataset schema (keys, kinds, choices, ranges); folders are checked later."""
    from simpletuner.data.schema import DatasetConfigError, read_entry

    for index, entry in enumerate(datasets):
        where = f"dataset {entry.get('id', index)!r} imported from {source}"
        try:
            read_entry(entry, entry.get("dataset_type", "image"), where)
        except DatasetConfigError as error:
            raise ImportConfigError(str(error)) from None


def _checked_options(options: dict[str, Any], imported: ImportedConfig) -> dict[str, Any]:
    """The options our table accepts; a refused value joins the unmapped list with the table's reason."""
    from simpletuner.options import options_by_name
    from simpletuner.options.values import coerce_value

    table = options_by_name()
    kept: dict[str, Any] = {}
    for name, value in options.items():
        try:
            coerce_value(table[name], value, "import")
        except ConfigError as error:
            imported.skip(name, value, f"our option refuses the value: {error}")
            continue
        kept[name] = value
    return kept


def _prompt_library(imported: ImportedConfig) -> dict[str, Any]:
    width = max(2, len(str(len(imported.prompts))))
    return {f"sample-{index:0{width}d}": prompt.as_library_entry()
            for index, prompt in enumerate(imported.prompts, start=1)}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def validation_problem(config_path: Path) -> str | None:
    """What ``simpletuner train --config config_path`` validation stops at, or None when it passes."""
    from simpletuner.options.resolve import resolve_run

    try:
        resolve_run(["--config", str(config_path)], environ={})
    except ConfigError as error:
        return str(error)
    return None


# --- the report ------------------------------------------------------------------------------------

def render_report(imported: ImportedConfig, source: Path, problem: str | None) -> str:
    """``import-report.md``: what was written, the settings that were not carried over and why,
    the decisions taken, and whether ``simpletuner train`` accepts the result."""
    lines = [f"# Import of {source.name} ({imported.source_format})", "",
             f"{len(imported.options)} options and {len(imported.datasets)} datasets written"
             + (f", {len(imported.prompts)} sample prompts in {PROMPTS_NAME}" if imported.prompts else "") + ".", ""]
    lines += ["## Not carried over", ""]
    if imported.unmapped:
        lines += unmapped_table(imported.unmapped)
    else:
        lines.append("Every setting has a counterpart.")
    if imported.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in imported.notes]
    lines += ["", "## Validation", ""]
    lines.append("`simpletuner train` accepts the written config." if problem is None else
                 f"`simpletuner train` validation stops at: {problem}")
    return "\n".join(lines) + "\n"


def unmapped_table(unmapped: list[Unmapped]) -> list[str]:
    """A Markdown table of the settings that were not carried over."""
    rows = ["| setting | value | reason |", "|---|---|---|"]
    for item in unmapped:
        value = json.dumps(item.value, ensure_ascii=False) if not isinstance(item.value, str) else item.value
        rows.append(f"| `{item.key}` | {_cell(value)} | {_cell(item.reason)} |")
    return rows


def _cell(text: str) -> str:
    text = text if len(text) <= 80 else text[:77] + "..."
    return text.replace("|", "\\|").replace("\n", " ")
