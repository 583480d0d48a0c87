"""The options table: one declaration per flag, coverage of the reference flag list, valid defaults, docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from simpletuner.options import all_options, alias_targets, closest_name, options_by_name
from simpletuner.options.docs import default_docs_path, render_options_markdown
from simpletuner.options.spec import Option
from simpletuner.options.values import coerce_value

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The reference flag list lives in the shared folder beside the clone; CI may run without it.
FLAG_LIST = REPO_ROOT.parent / "shared" / "spec" / "002-flags.txt"

_PYTHON_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "json": (dict, list, str)}


def test_names_and_aliases_are_unique() -> None:
    names = [option.name for option in all_options()]
    aliases = [alias for option in all_options() for alias in option.aliases]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    assert len(aliases) == len(set(aliases)), sorted({a for a in aliases if aliases.count(a) > 1})
    assert not set(names) & set(aliases)
    assert len(options_by_name()) == len(names)


def test_known_aliases_point_at_their_new_names() -> None:
    assert alias_targets()["checkpointing_steps"] == "checkpoint_step_interval"
    assert alias_targets()["validation_steps"] == "validation_step_interval"


@pytest.mark.skipif(not FLAG_LIST.is_file(), reason=f"{FLAG_LIST} not present (shared/ is not beside the clone)")
def test_every_reference_flag_is_declared() -> None:
    flags = [line.strip().lstrip("-") for line in FLAG_LIST.read_text(encoding="utf-8").splitlines() if line.strip()]
    known = set(options_by_name()) | set(alias_targets())
    missing = [flag for flag in flags if flag not in known]
    assert len(flags) > 300
    assert missing == []


def _default_problems(option: Option) -> list[str]:
    problems = []
    if not (option.group and option.help.strip()):
        problems.append("needs a group and a help text")
    if option.default is None:
        return problems
    if not isinstance(option.default, _PYTHON_TYPES[option.kind]) or (
        option.kind in ("int", "float") and isinstance(option.default, bool)
    ):
        return problems + [f"default {option.default!r} is not a {option.kind}"]
    if option.choices is not None and option.default != "":
        values = option.default if isinstance(option.default, list) else [option.default]
        if not all(value in option.choices for value in values):
            problems.append(f"default {option.default!r} not among {option.choices}")
    if coerce_value(option, option.default, "default") != option.default:
        problems.append(f"default {option.default!r} changes when coerced")
    return problems


def test_every_default_is_valid_for_its_kind_and_choices() -> None:
    problems = {option.name: p for option in all_options() if (p := _default_problems(option))}
    assert problems == {}
    assert options_by_name()["learning_rate"].default == 1e-4
    assert options_by_name()["model_type"].default == "lora"


def test_required_options() -> None:
    required = sorted(option.name for option in all_options() if option.required)
    assert required == ["model_family", "model_type", "output_dir"]
    # model_type always has a value (lora); the other two must come from the user.
    assert [name for name in required if options_by_name()[name].default is None] == ["model_family", "output_dir"]


def test_declaring_a_bad_option_fails_early() -> None:
    with pytest.raises(ValueError, match="unknown kind 'integer'"):
        Option(name="x", kind="integer", default=0, help="h", group="g")
    with pytest.raises(ValueError, match="without leading dashes"):
        Option(name="--x", kind="int", default=0, help="h", group="g")


def test_closest_name_suggests_the_intended_option() -> None:
    assert closest_name("learning_rat") == "learning_rate"
    assert closest_name("train_batchsize") == "train_batch_size"
    assert closest_name("zzzzzz") is None


def test_options_markdown_is_up_to_date() -> None:
    assert default_docs_path() == REPO_ROOT / "documentation" / "OPTIONS.md"
    committed = default_docs_path().read_text(encoding="utf-8") if default_docs_path().is_file() else ""
    assert render_options_markdown() == committed, (
        "documentation/OPTIONS.md is stale; run `simpletuner options --write-docs` and commit the result"
    )


def test_configuration_docs_supported_values_table_is_up_to_date() -> None:
    from simpletuner.options.docs import default_configuration_docs_path, with_supported_values_table

    assert default_configuration_docs_path() == REPO_ROOT / "documentation" / "CONFIGURATION.md"
    committed = default_configuration_docs_path().read_text(encoding="utf-8")
    assert with_supported_values_table(committed) == committed, (
        "the supported-values table of documentation/CONFIGURATION.md is stale; run "
        "`simpletuner options --write-docs` and commit the result"
    )


def test_options_markdown_lists_every_option_and_marks_unimplemented() -> None:
    text = render_options_markdown()
    implemented = sum(option.implemented for option in all_options())
    assert f"{len(all_options())} options, {implemented} implemented." in text
    for option in all_options():
        assert f"| `--{option.name}`" in text
    assert "(also read as `--checkpointing_steps`)" in text
    unimplemented_row = next(line for line in text.splitlines() if line.startswith("| `--sla_config`"))
    assert "| not yet |" in unimplemented_row
