"""The per-dataset ``text_embeds`` key: which text-embed entry (cache folder and caption filters) a
dataset uses when the file lists several."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from simpletuner.data.build import build_training_data
from simpletuner.data.config import DatasetConfigError, parse_dataset_plan
from tests.data.fake_model import FakeModel, local, make_config, write_images


def _plan(tmp_path: Path, **photo_keys):
    return parse_dataset_plan([
        local("photos", tmp_path / "photos", **photo_keys),
        local("art", tmp_path / "art"),
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "text"), "default": True},
        {"id": "alt", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "alt"), "default": False,
         "caption_filter_list": ["^a "]},
    ])


def test_a_dataset_uses_the_text_embeds_entry_it_names(tmp_path: Path) -> None:
    write_images(tmp_path / "photos", 2, caption="a photo")
    write_images(tmp_path / "art", 2, caption="a painting", prefix="art")
    plan = _plan(tmp_path, text_embeds="alt")
    assert plan.text_embeds_for(plan.images[0]).id == "alt" and plan.text_embeds_for(plan.images[1]).id == "text"
    model = FakeModel()
    data = build_training_data(make_config(tmp_path), model, plan, show_progress=False, num_processes=1)
    batches = [data.next_batch() for _ in range(4)]
    by_dataset = {batch["dataset_id"]: batch for batch in batches}
    # alt's filter applies to photos only; the default entry (no filter) serves art
    assert sorted(by_dataset["photos"]["captions"]) == ["photo 0", "photo 1"]
    assert sorted(by_dataset["art"]["captions"]) == ["a painting 0", "a painting 1"]
    # each caption's embeds live in its entry's folder (and "" in both, for caption dropout)
    assert len(list((tmp_path / "alt").rglob("*.safetensors"))) == 3
    assert len(list((tmp_path / "text").rglob("*.safetensors"))) == 3
    assert by_dataset["photos"]["empty_prompt"]["prompt_embeds"].shape[0] == 2
    assert data.text_report.built == 6


def test_unknown_text_embeds_id_is_a_config_error(tmp_path: Path) -> None:
    for name in ("photos", "art"):
        (tmp_path / name).mkdir()
    with pytest.raises(DatasetConfigError) as error:
        _plan(tmp_path, text_embeds="alt-text")
    message = str(error.value)
    assert "dataset 'photos'" in message and "key 'text_embeds' names 'alt-text', which is not in the file" in message
    assert "['text', 'alt']" in message
    with pytest.raises(DatasetConfigError, match="names 'art', which has dataset_type 'image'"):
        _plan(tmp_path, text_embeds="art")
