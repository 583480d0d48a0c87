"""documentation/CONFIGURATION.md says what the code does: its supported-values table is generated
from the options table and the model registry, and its error examples are the messages users get."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from simpletuner.models.registry import FAMILIES
from simpletuner.options import ConfigError, options_by_name
from simpletuner.options.docs import (SUPPORTED_TABLE_END, SUPPORTED_TABLE_START, default_configuration_docs_path,
                                      partially_supported_values, render_supported_values_table,
                                      with_supported_values_table, write_configuration_table)
from simpletuner.options.resolve import resolve_run

#: Each example of the "Errors" table, and the command line (with the project's config/config.json)
#: that gets it. A "..." in the documented text stands for the rest of the message.
ERROR_EXAMPLES = {
    "config/config.json: unknown option `learning_rat`; did you mean `learning_rate`?":
        ["--config", "config/bad-key.json"],
    "config/config.json: `train_batch_size` = 'four' is not an integer": ["--config", "config/bad-type.json"],
    "command line: `use_ema` = 'maybe' is not true or false": ["--use_ema", "maybe"],
    "command line: `model_type` = 'dora' is not one of: full, lora": ["--model_type", "dora"],
    "config/config.json: malformed JSON at line 4, column 1: Expecting property name enclosed in double quotes":
        ["--config", "config/broken.json"],
    "`--sla_config` is not supported yet (got {'topk': 4}); remove it from your config or command line":
        ["--sla_config", '{"topk": 4}'],
    "`--validation_noise_scheduler perflow` is not supported yet; supported values: ddim, ddpm, euler, euler-a, unipc, "
    "dpm++": ["--validation_noise_scheduler", "perflow"],
    "`--model_flavour 2.1` is not a flavour of sd1x; choose one of: 1.5, 1.4, dreamshaper, realvis":
        ["--model_flavour", "2.1"],
    "`--lora_rank` only applies to `--model_type lora`, but `--model_type full` is set; remove one of them":
        ["--model_type", "full"],
    "`--ema_validation` only applies with `--use_ema true`; add it or remove `--ema_validation`":
        ["--ema_validation", "ema_only"],
    "missing required option(s): `--model_family`, `--output_dir`; ...": ["--config", "config/empty.json"],
    "`--data_backend_config`: file 'config/multidatabackend.json' does not exist":
        ["--data_backend_config", "config/multidatabackend.json"],
    "`--train_batch_size` = 0 must be between 1 and 65536 (command line)": ["--train_batch_size", "0"],
}


def documented_errors() -> list[str]:
    """The messages of the "Errors" table, as written (between the backticks of the second column)."""
    text = default_configuration_docs_path().read_text(encoding="utf-8")
    section = text[text.index("## Errors"):text.index(SUPPORTED_TABLE_START)]
    messages = []
    for row in section.splitlines():
        cells = row.split(" | ")
        if row.startswith("| ") and len(cells) == 2 and "`" in cells[1]:
            messages.append(re.sub(r"^`+ ?|`+ ?\|$| ?`+$", "", cells[1].removesuffix(" |")).strip())
    return messages


def project(root: Path) -> Path:
    """config/config.json for an sd1x LoRA plus the broken variants the examples name."""
    config = root / "config"
    config.mkdir()
    (root / "images").mkdir()
    datasets = root / "datasets.json"
    datasets.write_text(json.dumps([
        {"id": "images", "type": "local", "instance_data_dir": str(root / "images")},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text")},
    ]))
    good = {"model_family": "sd1x", "output_dir": str(root / "out"), "data_backend_config": str(datasets),
            "lora_rank": 4}
    (config / "config.json").write_text(json.dumps(good))
    (config / "bad-key.json").write_text(json.dumps({**good, "learning_rat": 1e-4}))
    (config / "bad-type.json").write_text(json.dumps({**good, "train_batch_size": "four"}))
    (config / "broken.json").write_text('{\n  "model_family": "sd1x",\n  "learning_rate": 1e-4,\n}\n')
    (config / "empty.json").write_text("{}")
    return root


def error_of(root: Path, argv: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(argv, environ={}, root=root)
    return str(error.value)


def test_every_documented_error_example_is_checked() -> None:
    assert sorted(documented_errors()) == sorted(ERROR_EXAMPLES)


@pytest.mark.parametrize("documented", list(ERROR_EXAMPLES))
def test_documented_error_is_the_real_message(documented: str, tmp_path: Path, monkeypatch) -> None:
    root = project(tmp_path)
    monkeypatch.chdir(root)
    argv = ERROR_EXAMPLES[documented]
    if argv[0] == "--config":  # the file's message names it as config/config.json, as the docs' examples do
        (root / "config" / "config.json").write_text((root / argv[1]).read_text())
        argv = ["--config", "config/config.json"]
    message = error_of(root, argv)
    expected = documented.split("...")[0]
    assert message.startswith(expected) if documented.endswith("...") else message == expected, message


def test_supported_values_table_follows_the_registry_and_the_table() -> None:
    partly = partially_supported_values()
    declared = set(options_by_name()["model_family"].choices)
    supported, refused = partly.get("model_family", (tuple(declared), ()))
    assert set(supported) == set(FAMILIES) and "flux" in supported and set(refused) == declared - set(FAMILIES)
    assert "optimizer" not in partly  # every declared optimizer works (prodigy included)
    table = render_supported_values_table()
    assert table.startswith(SUPPORTED_TABLE_START) and table.endswith(SUPPORTED_TABLE_END)
    assert "| `mixed_precision` | `no`, `bf16`, `fp16` | `fp8` |" in table.splitlines()


def test_write_docs_rewrites_only_the_generated_table(tmp_path: Path, monkeypatch, capsys) -> None:
    import simpletuner.data.schema_docs as schema_docs
    import simpletuner.options.docs as options_docs
    from simpletuner.cli import main

    stale = f"# Configuration\n\nhand-written\n\n{SUPPORTED_TABLE_START}\n| `model_family` | `sd1x` |\n" \
            f"{SUPPORTED_TABLE_END}\n\nmore prose\n"
    copy = tmp_path / "CONFIGURATION.md"
    copy.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(options_docs, "default_configuration_docs_path", lambda: copy)
    monkeypatch.setattr(options_docs, "write_options_markdown", lambda: tmp_path / "OPTIONS.md")
    monkeypatch.setattr(schema_docs, "write_datasets_markdown", lambda: tmp_path / "DATASETS.md")
    assert main(["options", "--write-docs"]) == 0
    assert f"wrote {copy}" in capsys.readouterr().out
    assert copy.read_text(encoding="utf-8") == (
        f"# Configuration\n\nhand-written\n\n{render_supported_values_table()}\n\nmore prose\n")
    copy.write_text("no markers here", encoding="utf-8")
    with pytest.raises(ValueError, match="lost the supported-values markers"):
        write_configuration_table(copy)
    assert with_supported_values_table(copy.read_text() + "\n" + SUPPORTED_TABLE_START + SUPPORTED_TABLE_END) \
        .endswith(render_supported_values_table())
