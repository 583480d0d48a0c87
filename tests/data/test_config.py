"""multidatabackend.json parsing: valid plans and the error messages users will read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simpletuner.data.config import (
    DatasetConfigError,
    ImageDatasetConfig,
    TextEmbedDatasetConfig,
    load_dataset_plan,
    parse_dataset_plan,
)


def _image(directory: Path, **extra) -> dict:
    return {"id": "photos", "type": "local", "instance_data_dir": str(directory), **extra}


_TEXT = {"id": "text", "dataset_type": "text_embeds", "type": "local", "cache_dir": "cache/text"}


def _write(tmp_path: Path, entries) -> Path:
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


def test_valid_plan_with_defaults_and_string_booleans(tmp_path: Path) -> None:
    path = _write(tmp_path, [_image(tmp_path, crop="true", repeats=2), _TEXT])
    plan = load_dataset_plan(path)
    assert plan.images == (
        ImageDatasetConfig(id="photos", type="local", instance_data_dir=str(tmp_path), crop=True, repeats=2),
    )
    assert plan.text_embeds == TextEmbedDatasetConfig(id="text", cache_dir="cache/text", default=True)
    assert plan.enabled_images == plan.images


def test_relative_paths_are_kept_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    plan = parse_dataset_plan([{"id": "a", "type": "local", "instance_data_dir": "imgs"}, _TEXT])
    assert plan.images[0].instance_data_dir == "imgs"


def test_global_defaults_fill_only_missing_fields(tmp_path: Path) -> None:
    cfg = ImageDatasetConfig(id="a", type="local", instance_data_dir=str(tmp_path), resolution=512.0)
    filled = cfg.with_global_defaults(1024, "pixel_area", "/cache")
    assert (filled.resolution, filled.resolution_type, filled.cache_dir_vae) == (512.0, "pixel_area", "/cache/vae/a")


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError) as err:
        parse_dataset_plan([_image(tmp_path, caption_strategie="filename"), _TEXT], source="mdb.json")
    message = str(err.value)
    assert "mdb.json" in message and "'photos'" in message
    assert "unknown key 'caption_strategie'" in message and "did you mean 'caption_strategy'?" in message


def test_wrong_type_names_key_value_and_expected_type(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError) as err:
        parse_dataset_plan([_image(tmp_path, repeats="three"), _TEXT], source="mdb.json")
    assert str(err.value) == (
        "mdb.json: dataset 'photos' (entry 0): key 'repeats' has value 'three' (str); expected an integer"
    )


def test_bool_rejects_other_strings(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match=r"key 'crop' has value 'yes'.*true/false"):
        parse_dataset_plan([_image(tmp_path, crop="yes"), _TEXT])


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "type": "local",,\n  }\n]\n')
    with pytest.raises(DatasetConfigError) as err:
        load_dataset_plan(path)
    assert str(path) in str(err.value)
    assert "line 3, column 20" in str(err.value)


def test_missing_directory_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetConfigError) as err:
        parse_dataset_plan([_image(missing), _TEXT])
    assert "instance_data_dir" in str(err.value) and str(missing) in str(err.value)


def test_disabled_dataset_may_point_at_missing_directory(tmp_path: Path) -> None:
    other = _image(tmp_path / "gone", id="old", disabled=True)
    plan = parse_dataset_plan([_image(tmp_path), other, _TEXT])
    assert [cfg.id for cfg in plan.enabled_images] == ["photos"]
    assert len(plan.images) == 2


def test_file_instead_of_directory(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_text("x")
    with pytest.raises(DatasetConfigError, match="is not a directory"):
        parse_dataset_plan([_image(file), _TEXT])


def test_duplicate_id(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError) as err:
        parse_dataset_plan([_image(tmp_path), _image(tmp_path), _TEXT])
    assert "'photos' (entry 1)" in str(err.value) and "already used by entry 0" in str(err.value)


def test_missing_text_embeds(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match="no text_embeds entry"):
        parse_dataset_plan([_image(tmp_path)])


def test_several_text_embeds_need_exactly_one_default(tmp_path: Path) -> None:
    second = {**_TEXT, "id": "text2"}
    with pytest.raises(DatasetConfigError, match="exactly one"):
        parse_dataset_plan([_image(tmp_path), _TEXT, second])
    plan = parse_dataset_plan([_image(tmp_path), _TEXT, {**second, "default": False}])
    assert plan.text_embeds.id == "text"


def test_needs_an_enabled_image_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match="no enabled image dataset"):
        parse_dataset_plan([_image(tmp_path, disabled=True), _TEXT])


def test_unknown_backend_lists_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match=r"'type' has value 'gcs'; use one of \['local', 'aws', 'parquet', "
                                                 r"'huggingface'\]"):
        parse_dataset_plan([_image(tmp_path, type="gcs"), _TEXT])
    with pytest.raises(DatasetConfigError, match="type 'aws' needs key 'aws_bucket_name'"):
        parse_dataset_plan([_image(tmp_path, type="aws"), _TEXT])
    with pytest.raises(DatasetConfigError, match="text embeddings are cached on the local disk"):
        parse_dataset_plan([_image(tmp_path), {**_TEXT, "type": "aws"}])


def test_instanceprompt_requires_prompt(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match="instance_prompt"):
        parse_dataset_plan([_image(tmp_path, caption_strategy="instanceprompt"), _TEXT])


def test_bad_choice_lists_valid_values(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match=r"'resolution_type' has value 'megapixel'.*'pixel_area'"):
        parse_dataset_plan([_image(tmp_path, resolution_type="megapixel"), _TEXT])


def test_missing_required_key_and_non_list(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match="required key 'instance_data_dir' is missing"):
        parse_dataset_plan([{"id": "a", "type": "local"}, _TEXT])
    with pytest.raises(DatasetConfigError, match="JSON list"):
        parse_dataset_plan({"id": "a"})  # type: ignore[arg-type]
