"""The dataset key table: one declaration per key, and what is derived from it (parsing, validation,
the settings classes' defaults, the wizard's questions, DATASETS.md), plus a bounded fuzz of entries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from simpletuner.data import schema
from simpletuner.data.config import (
    AwsSettings,
    DatasetConfigError,
    DatasetPlan,
    ImageDatasetConfig,
    TableSettings,
    TextEmbedDatasetConfig,
    VideoSettings,
    load_dataset_plan,
    parse_dataset_plan,
)
from simpletuner.data.schema import DATASET_KEYS, DATASET_TYPES, IMAGE_LIKE_TYPES, REQUIRED, DatasetKey
from simpletuner.data.schema_docs import default_datasets_docs_path, render_datasets_markdown, write_datasets_markdown

_TEXT = {"id": "text", "dataset_type": "text_embeds", "cache_dir": "cache/text"}


def _plan(folder: Path, **keys) -> DatasetPlan:
    return parse_dataset_plan([{"id": "photos", "type": "local", "instance_data_dir": str(folder), **keys}, _TEXT],
                              source="mdb.json")


def _error(folder: Path, **keys) -> str:
    with pytest.raises(DatasetConfigError) as error:
        _plan(folder, **keys)
    return str(error.value)


def _as_json(value):
    """A parsed default as it is written in JSON (tuples are lists)."""
    return list(value) if isinstance(value, tuple) else value


# --- the table itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", DATASET_KEYS, ids=lambda key: f"{key.section or 'entry'}.{key.name}")
def test_every_key_has_help_a_kind_and_a_default_that_parses(key: DatasetKey) -> None:
    assert key.help.strip().endswith((".", ")")), key.name
    assert key.kind in schema.KIND_WORDS
    assert set(key.applies_to) <= set(DATASET_TYPES) and key.applies_to
    assert set(key.backends) <= set(schema.SUPPORTED_BACKEND_TYPES) | set(schema.METADATA_BACKENDS)
    if key.required:
        assert key.kind not in schema.NULLABLE_KINDS, "null cannot stand for a required key"
        return
    # the default is what parsing the written default gives back: it has the key's type, choice and range
    assert key.parse(_as_json(key.default), "default") == key.default
    if key.kind in schema.NULLABLE_KINDS:
        assert key.parse(None, "null") == key.default


def test_no_key_is_declared_twice_for_one_dataset_type() -> None:
    for section in schema.SECTIONS:
        for dataset_type in DATASET_TYPES:
            names = [key.name for key in DATASET_KEYS if key.section == section
                     and (section != "" or dataset_type in key.applies_to)]
            assert len(names) == len(set(names)), (section, dataset_type)


def test_settings_classes_take_their_defaults_from_the_table() -> None:
    """Every image-entry key is a field (aws_* keys of AwsSettings) whose default is the table's; the keys
    that only some dataset types take default to "not set" on the others."""
    fields = {f.name: f for f in dataclasses.fields(ImageDatasetConfig)}
    aws = {f.name: f for f in dataclasses.fields(AwsSettings)}
    for name, key in schema.keys_for("image").items():
        if key.backends == ("aws",):
            assert aws[name[len("aws_"):]].default in (key.default, dataclasses.MISSING), name
        elif key.required:
            assert fields[name].default is dataclasses.MISSING, name
        else:
            assert fields[name].default == key.default, name
    assert fields["conditioning_type"].default is None  # "controlnet" only where the key applies
    assert schema.default_of("conditioning_type", "conditioning") == "controlnet"
    for name, key in schema.keys_for("text_embeds").items():
        if name in {f.name for f in dataclasses.fields(TextEmbedDatasetConfig)} and not key.required:
            assert getattr(TextEmbedDatasetConfig(id="t"), name) == key.default
    assert VideoSettings() == VideoSettings(**schema.defaults(section="video"))
    table_fields = {f.name for f in dataclasses.fields(TableSettings)}
    assert set(schema.keys_for(section="parquet")) <= table_fields
    assert set(schema.keys_for(section="huggingface")) <= table_fields
    assert TableSettings.defaults_for("huggingface").image_column == "image"


def test_parsed_defaults_equal_a_hand_built_config(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    assert plan.images[0] == ImageDatasetConfig(id="photos", type="local", instance_data_dir=str(tmp_path))
    assert plan.images[0].metadata_backend == "discovery"
    assert plan.text_embeds == TextEmbedDatasetConfig(id="text", cache_dir="cache/text")


def test_global_options_that_fill_keys_are_declared_as_inherited() -> None:
    from simpletuner.data.settings import _INHERITED_KEYS, DEFAULT_CLIP_SECONDS, DEFAULT_FRAMERATE
    from simpletuner.options import options_by_name

    note = schema.key_named("num_frames", section="video").default_note
    assert f"{DEFAULT_CLIP_SECONDS} seconds" in note and f"{DEFAULT_CLIP_SECONDS * DEFAULT_FRAMERATE} at the " \
        f"default {DEFAULT_FRAMERATE}" in note

    for name in _INHERITED_KEYS:
        assert schema.key_named(name).inherits == name
    for key in DATASET_KEYS:
        if key.inherits:
            assert key.inherits in options_by_name(), f"{key.name} inherits an unknown option --{key.inherits}"


# --- validation messages ------------------------------------------------------------------------------


def test_unknown_key_names_the_closest_known_key(tmp_path: Path) -> None:
    message = _error(tmp_path, repeat=2)
    assert message.startswith("mdb.json: dataset 'photos' (entry 0): unknown key 'repeat'; did you mean 'repeats'?")
    with pytest.raises(DatasetConfigError, match="unknown key 'cache_di'; did you mean 'cache_dir'"):
        parse_dataset_plan([{"id": "a", "type": "local", "instance_data_dir": str(tmp_path)},
                            {**_TEXT, "cache_di": "x"}])
    assert "known keys are" in _error(tmp_path, zzzzzz=1)


@pytest.mark.parametrize(("keys", "expected"), [
    ({"resolution": 1e40}, "key 'resolution' has value 1e+40; use a positive number, at most 65536, or remove the "
                           "key to use --resolution"),
    ({"repeats": 1e30}, "key 'repeats' has value 1e+30; use 0 or more, at most 10000"),
    ({"repeats": -1}, "key 'repeats' has value -1; use 0 or more, at most 10000"),
    ({"start_step": -5}, "key 'start_step' has value -5; use 0 or more, at most 9223372036854775807"),
    ({"probability": -0.5}, "key 'probability' has value -0.5; use 0 or more, at most 1000000"),
    ({"resolution": 0}, "key 'resolution' has value 0; use a positive number"),
    ({"crop_aspect_buckets": [0.5, 1000]}, "key 'crop_aspect_buckets' has value 1000.0; use a positive number, at "
                                           "most 100"),
    ({"dataset_type": "video", "video": {"num_frames": 10**7}}, "key 'num_frames' has value 10000000; use 1 or more, "
                                                                "at most 1000000"),
])
def test_out_of_range_values_name_dataset_key_value_and_range(tmp_path: Path, keys: dict, expected: str) -> None:
    message = _error(tmp_path, **keys)
    assert message.startswith("mdb.json: dataset 'photos' (entry 0): ") and expected in message


def test_huge_values_are_shortened_in_messages(tmp_path: Path) -> None:
    message = _error(tmp_path, repeats=10**5000)
    assert "key 'repeats' has value <an integer of about 5000 digits>; use 0 or more" in message
    message = _error(tmp_path, crop_style="x" * 100_000)
    assert "(100000 characters); use one of ['center', 'corner', 'random']" in message and len(message) < 400
    assert len(_error(tmp_path, resolution=[[1] * 10_000] * 100)) < 500


@pytest.mark.parametrize(("keys", "expected"), [
    ({"resolution": "big"}, "key 'resolution' has value 'big' (str); expected a number or null"),
    ({"repeats": True}, "key 'repeats' has value True (bool); expected an integer"),
    ({"probability": float("nan")}, "key 'probability' has value nan (float); expected a number"),
    ({"probability": float("inf")}, "key 'probability' has value inf (float); expected a number"),
    ({"minimum_aspect_ratio": 10**400}, "(int); expected a number or null"),  # no OverflowError
    ({"crop_aspect_buckets": [1, float("inf")]}, "expected a list of positive numbers"),
    ({"dataset_type": "video", "video": []}, "key 'video' has value [] (list); expected a JSON object or null"),
])
def test_wrong_types_name_key_value_and_expected_type(tmp_path: Path, keys: dict, expected: str) -> None:
    assert expected in _error(tmp_path, **keys)


def test_null_means_the_default(tmp_path: Path) -> None:
    cfg = _plan(tmp_path, resolution=None, conditioning_data=None, skip_file_discovery=None).images[0]
    assert (cfg.resolution, cfg.conditioning_data, cfg.skip_file_discovery) == (None, (), None)
    plan = parse_dataset_plan([
        {"id": "photos", "type": "local", "instance_data_dir": str(tmp_path), "conditioning_data": "masks"},
        {"id": "masks", "type": "local", "instance_data_dir": str(tmp_path), "dataset_type": "conditioning",
         "conditioning_type": None}, _TEXT])
    assert plan.conditioning["masks"].conditioning_type == "controlnet"


def test_a_key_on_the_wrong_dataset_type_names_the_types_that_take_it(tmp_path: Path) -> None:
    message = _error(tmp_path, conditioning_type="mask")
    assert "key 'conditioning_type' is not supported on image datasets; it only applies to conditioning datasets" \
           in message and "did you mean" not in message
    message = _error(tmp_path, cache_dir="x")
    assert "only applies to text_embeds datasets" in message and "did you mean 'cache_dir_vae'?" in message
    with pytest.raises(DatasetConfigError) as error:
        parse_dataset_plan([{"id": "a", "type": "local", "instance_data_dir": str(tmp_path)}, {**_TEXT, "repeats": 1}],
                           source="mdb.json")
    assert str(error.value).startswith(
        "mdb.json: dataset 'text' (entry 1): key 'repeats' is not supported on text_embeds datasets; it only "
        "applies to image, video, conditioning and eval datasets")
    assert "'conditioning_data' is not supported on eval datasets" in _error(
        tmp_path, dataset_type="eval", conditioning_data="masks")
    message = _error(tmp_path, dataset_name=str(tmp_path))
    assert "key 'dataset_name' is only used with \"type\": \"huggingface\" or \"metadata_backend\": \"huggingface\"" \
           in message


def test_ids_that_would_break_cache_folders_are_refused(tmp_path: Path) -> None:
    for bad in ("", "  ", "../elsewhere", "/abs", "a/../../b"):
        assert "key 'id' has value" in _error(tmp_path, id=bad), bad
    assert _plan(tmp_path, id="my photos 2024").images[0].id == "my photos 2024"


def test_paths_the_system_cannot_open_are_clean_errors(tmp_path: Path) -> None:
    for bad in ("a\x00b", "\ud800", "x" * 5000):
        message = _error(tmp_path, instance_data_dir=bad)
        assert "key 'instance_data_dir' has value" in message
        message.encode("utf-8")  # printable on any terminal: odd characters are escaped


def test_file_errors_are_clean(tmp_path: Path) -> None:
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(DatasetConfigError, match="not UTF-8 text"):
        load_dataset_plan(latin)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetConfigError, match="nested too deeply"):
        load_dataset_plan(deep)
    digits = tmp_path / "digits.json"
    digits.write_text('[{"repeats": ' + "9" * 6000 + "}]")
    with pytest.raises(DatasetConfigError, match="invalid JSON"):
        load_dataset_plan(digits)
    with pytest.raises(DatasetConfigError, match="cannot read"):
        load_dataset_plan(tmp_path)


# --- the wizard ----------------------------------------------------------------------------------------


def test_wizard_dataset_questions_come_from_the_table() -> None:
    from simpletuner.configure.questions import coerce_dataset_value, dataset_choices, dataset_question
    from simpletuner.options import ConfigError

    question = dataset_question("crop_style", {})
    assert (question.help, question.choices, question.default) == (
        schema.key_named("crop_style").help, schema.CROP_STYLES, "center")
    assert dataset_question("repeats", {}).default == "0"
    assert dataset_choices("caption_strategy") == ("textfile", "filename", "instanceprompt")
    assert dataset_question("resolution", {}).check("1e40").startswith(
        "answer: key 'resolution' has value 1e+40; use a positive number, at most 65536")
    with pytest.raises(ConfigError, match="key 'skip_file_discovery' has value 'foo'"):
        coerce_dataset_value("skip_file_discovery", "vae foo", "--set dataset.skip_file_discovery")
    assert coerce_dataset_value("cache_dir", "", "--set", "text_embeds") is None


# --- DATASETS.md -------------------------------------------------------------------------------------


def test_datasets_md_key_tables_are_current() -> None:
    committed = default_datasets_docs_path().read_text(encoding="utf-8")
    assert render_datasets_markdown(committed) == committed, (
        "the key tables of documentation/DATASETS.md are stale; run `simpletuner options --write-docs` and commit "
        "the result")


def test_write_docs_regenerates_a_stale_table(tmp_path: Path) -> None:
    committed = default_datasets_docs_path().read_text(encoding="utf-8")
    row = "| `repeats` | integer | `0` |"
    assert row in committed
    stale = tmp_path / "DATASETS.md"
    stale.write_text(committed.replace(row, "| `repeats` | integer | `1` |"), encoding="utf-8")
    assert render_datasets_markdown(stale.read_text(encoding="utf-8")) != stale.read_text(encoding="utf-8")
    write_datasets_markdown(stale)
    assert stale.read_text(encoding="utf-8") == committed
    with pytest.raises(ValueError, match="no markers for the key tables"):
        render_datasets_markdown("# Datasets\n")


def test_options_write_docs_also_writes_the_dataset_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import simpletuner.data.schema_docs as schema_docs
    import simpletuner.options.docs as options_docs
    from simpletuner.cli import cmd_options

    committed = default_datasets_docs_path().read_text(encoding="utf-8")
    copy = tmp_path / "DATASETS.md"
    copy.write_text(committed.replace("| `repeats` | integer | `0` |", "| `repeats` | integer | stale |"),
                    encoding="utf-8")
    monkeypatch.setattr(schema_docs, "default_datasets_docs_path", lambda: copy)
    monkeypatch.setattr(options_docs, "write_options_markdown", lambda: tmp_path / "OPTIONS.md")
    monkeypatch.setattr(options_docs, "write_configuration_table", lambda: tmp_path / "CONFIGURATION.md")  # not the repo's
    assert cmd_options(["--write-docs"]) == 0
    assert copy.read_text(encoding="utf-8") == committed
    assert f"wrote {copy}" in capsys.readouterr().out


def test_every_key_appears_in_a_docs_table() -> None:
    committed = default_datasets_docs_path().read_text(encoding="utf-8")
    for key in DATASET_KEYS:
        assert f"| `{key.name}`" in committed, key.name


# --- fuzz: every entry is a valid plan or a DatasetConfigError, never another exception ------------------

#: Values that broke parsers before: wrong types, empty and huge values, nested garbage, odd characters.
NASTY_VALUES = [
    None, True, False, 0, -1, 1, 2**63, -(2**63) - 1, 10**400, 0.5, -0.0, 1e-320, 1e40, 1e308, float("nan"),
    float("inf"), float("-inf"), "", " ", "true", "null", "0", "-1", "1e40", "x" * 100_000, "a\x00b", "\ud800", "..",
    "/", "s3://", "s3:///x", "vae, aspect", "🙂", [], [1], [0], [-1.0], [float("inf")], ["a", 1], [[[[[]]]]],
    {}, {"a": 1}, {"path": "x"}, {"num_frames": 0}, {"": None}, [None] * 50,
]


def _deep(depth: int):
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


NASTY_VALUES.append(_deep(5000))


def _check_outcome(entries, folder: Path, config) -> None:
    """Parse ``entries``; a valid plan must also survive the global data options."""
    from simpletuner.data.settings import check_global_data_options

    try:
        plan = parse_dataset_plan(entries, source="fuzz.json")
    except DatasetConfigError as error:
        message = str(error)
        assert message.startswith("fuzz.json: ") and len(message) < 2000, message[:300]
        message.encode("utf-8")
        return
    assert isinstance(plan, DatasetPlan)
    try:
        check_global_data_options(config, plan)
    except DatasetConfigError:
        pass


@pytest.fixture(scope="module")
def fuzz_workspace(tmp_path_factory: pytest.TempPathFactory):
    from tests.data.fake_model import make_config

    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "images").mkdir()
    return folder, make_config(folder)


_KEY_NAMES = sorted({key.name for key in DATASET_KEYS} | {"disable", "is_regularization_data", "", "Repeats"})


@pytest.mark.parametrize("value", NASTY_VALUES, ids=[f"{i}-{type(v).__name__}" for i, v in enumerate(NASTY_VALUES)])
def test_nasty_value_for_every_key_is_a_plan_or_a_clean_error(fuzz_workspace, value) -> None:
    folder, config = fuzz_workspace
    base = {"id": "photos", "type": "local", "instance_data_dir": str(folder / "images")}
    for name in _KEY_NAMES:
        _check_outcome([{**base, name: value}, _TEXT], folder, config)
        _check_outcome([base, {**_TEXT, name: value}], folder, config)
    _check_outcome([value, _TEXT], folder, config)
    _check_outcome(value, folder, config)


def test_fuzzed_entries_are_plans_or_clean_errors(fuzz_workspace) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    folder, config = fuzz_workspace
    scalars = strategies.one_of(
        strategies.none(), strategies.booleans(), strategies.integers(), strategies.floats(),
        strategies.text(max_size=30), strategies.sampled_from(NASTY_VALUES[:-1]),
        strategies.sampled_from([c for key in DATASET_KEYS for c in key.choices]))
    values = strategies.recursive(scalars, lambda inner: strategies.one_of(
        strategies.lists(inner, max_size=4), strategies.dictionaries(
            strategies.one_of(strategies.sampled_from(_KEY_NAMES), strategies.text(max_size=8)), inner, max_size=4)),
        max_leaves=12)
    keys = strategies.one_of(strategies.sampled_from(_KEY_NAMES), strategies.text(max_size=12))
    base = {"id": "photos", "type": "local", "instance_data_dir": str(folder / "images")}
    entries = strategies.dictionaries(keys, values, max_size=6).map(lambda extra: [{**base, **extra}, _TEXT])

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(entries)
    def run(generated) -> None:
        _check_outcome(generated, folder, config)

    run()


def test_fuzzed_files_are_plans_or_clean_errors(tmp_path: Path) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    path = tmp_path / "multidatabackend.json"
    valid = json.dumps([{"id": "a", "type": "local", "instance_data_dir": str(tmp_path)}, _TEXT]).encode()

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(strategies.one_of(
        strategies.binary(max_size=200),
        strategies.integers(0, len(valid)).flatmap(lambda cut: strategies.binary(max_size=8).map(
            lambda junk: valid[:cut] + junk + valid[cut:]))))
    def run(content: bytes) -> None:
        path.write_bytes(content)
        try:
            assert isinstance(load_dataset_plan(path), DatasetPlan)
        except DatasetConfigError as error:
            assert str(error).startswith(str(path))

    run()


def test_required_sentinel_is_not_a_value() -> None:
    assert repr(REQUIRED) == "REQUIRED" and schema.key_named("id").required
    assert all(key.name in schema.keys_for(t) for key in DATASET_KEYS if key.section == "" for t in key.applies_to)
    assert set(IMAGE_LIKE_TYPES) | {"text_embeds"} == set(DATASET_TYPES)
