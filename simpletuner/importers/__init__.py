"""``simpletuner import-config``: turn another trainer's config into ours.

One module per source tool (:mod:`.kohya`, :mod:`.ai_toolkit`, :mod:`.onetrainer`) translates its
file into an :class:`~simpletuner.importers.common.ImportedConfig`; :mod:`.writer` checks that
against our option table and dataset schema and writes the files. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

from simpletuner.importers.common import ImportConfigError, ImportedConfig

FORMATS = ("kohya", "ai-toolkit", "onetrainer")


def sniff_format(path: Path) -> str:
    """The source tool of ``path``, from its extension and a look at its content."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "ai-toolkit"
    if suffix == ".toml" or suffix in (".sh", ".bat", ".ps1", ".cmd"):
        return "kohya"
    if suffix == ".json":
        return "onetrainer"
    try:
        head = path.read_text(encoding="utf-8-sig", errors="replace")[:20000]
    except OSError as error:
        raise ImportConfigError(f"{str(path)!r} cannot be read ({error})") from None
    if "train_network.py" in head or "sdxl_train" in head or "flux_train" in head or "train_db.py" in head:
        return "kohya"
    if head.lstrip().startswith("{"):
        return "onetrainer"
    if "process:" in head:
        return "ai-toolkit"
    raise ImportConfigError(f"cannot tell which tool wrote {str(path)!r}; pass --format with one of {list(FORMATS)}")


def read_foreign_config(path: Path, source_format: str | None = None, model_family: str | None = None) -> ImportedConfig:
    """``path`` translated into our settings (not yet checked or written)."""
    if not path.is_file():
        raise ImportConfigError(f"{str(path)!r} does not exist; give the path of a kohya TOML or command line, an "
                                "ai-toolkit YAML or a OneTrainer JSON")
    source_format = source_format or sniff_format(path)
    if source_format == "kohya":
        from simpletuner.importers.kohya import load_kohya

        return load_kohya(path, model_family)
    if source_format == "ai-toolkit":
        from simpletuner.importers.ai_toolkit import load_ai_toolkit

        return load_ai_toolkit(path, model_family)
    if source_format == "onetrainer":
        from simpletuner.importers.onetrainer import load_onetrainer

        return load_onetrainer(path, model_family)
    raise ImportConfigError(f"--format {source_format!r} is not one of {list(FORMATS)}")
