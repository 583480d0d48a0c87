"""Caption filters, instance-prompt options and multi-line captions (one variant per epoch)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

from simpletuner.data.build import build_training_data
from simpletuner.data.caption_rules import CaptionRules, caption_for_epoch, load_filter_list
from simpletuner.data.config import DatasetConfigError, parse_dataset_plan
from simpletuner.data.metadata import scan_image_dataset
from simpletuner.data.settings import resolve_dataset
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images


def _captioned(folder: Path, captions: dict[str, str]) -> None:
    write_images(folder, len(captions), caption=None)
    for index, text in enumerate(captions.values()):
        (folder / f"img_{index:02d}.txt").write_text(text, encoding="utf-8")


def _scan(folder: Path, **keys):
    cfg = parse_dataset_plan([local("d", folder, **keys), {"id": "t", "dataset_type": "text_embeds",
                                                           "cache_dir": "x"}]).images[0]
    return scan_image_dataset(cfg)


def test_filter_file_removes_literals_and_regexes_and_applies_sed(tmp_path: Path) -> None:
    _captioned(tmp_path / "d", {"a": "arafed this image shows a cat on a mat",
                                "b": "a photo of a dog, watermark",
                                "c": "arafed watermark"})
    filters = tmp_path / "filters.txt"
    filters.write_text("arafed \n^this image shows \nwatermark\ns/cat/tabby cat/\n\n", encoding="utf-8")
    result = _scan(tmp_path / "d", caption_filter_list=str(filters))
    assert [r.caption for r in result.records] == ["a tabby cat on a mat", "a photo of a dog,"]
    assert result.skipped == [(tmp_path / "d" / "img_02.png", "caption is empty after caption_filter_list")]


def test_filter_list_as_json_file_and_as_inline_list(tmp_path: Path) -> None:
    _captioned(tmp_path / "d", {"a": "blurry photo of a red car"})
    (tmp_path / "f.json").write_text(json.dumps(["blurry ", "photo of "]), encoding="utf-8")
    assert _scan(tmp_path / "d", caption_filter_list=str(tmp_path / "f.json")).records[0].caption == "a red car"
    assert _scan(tmp_path / "d", caption_filter_list=["red "]).records[0].caption == "blurry photo of a car"
    with pytest.raises(DatasetConfigError, match="caption_filter_list"):
        load_filter_list(str(tmp_path / "missing.txt"), "dataset 'd'")


def test_prepend_and_only_instance_prompt_keys(tmp_path: Path) -> None:
    _captioned(tmp_path / "d", {"a": "a cat"})
    (tmp_path / "d" / "uncaptioned.png").write_bytes((tmp_path / "d" / "img_00.png").read_bytes())
    prepended = _scan(tmp_path / "d", instance_prompt="sks", prepend_instance_prompt=True)
    assert [r.caption for r in prepended.records] == ["sks a cat"]
    only = _scan(tmp_path / "d", instance_prompt="sks", only_instance_prompt=True)
    assert [r.caption for r in only.records] == ["sks", "sks"]  # no caption file needed
    with pytest.raises(DatasetConfigError, match="instance_prompt"):
        _scan(tmp_path / "d", only_instance_prompt=True)


def test_global_flags_fill_what_the_entry_leaves_out(tmp_path: Path) -> None:
    _captioned(tmp_path / "d", {"a": "a cat"})
    plan = make_plan(tmp_path, local("d", tmp_path / "d"), local("e", tmp_path / "d", prepend_instance_prompt=False))
    config = make_config(tmp_path, instance_prompt="sks", prepend_instance_prompt=True)
    first, second = (resolve_dataset(cfg, config) for cfg in plan.images)
    assert (first.prepend_instance_prompt, second.prepend_instance_prompt) == (True, False)
    assert [r.caption for r in scan_image_dataset(first).records] == ["sks a cat"]
    assert [r.caption for r in scan_image_dataset(second).records] == ["a cat"]
    only = resolve_dataset(plan.images[0], make_config(tmp_path, instance_prompt="sks", only_instance_prompt=True))
    assert [r.caption for r in scan_image_dataset(only).records] == ["sks"]
    strategy = resolve_dataset(plan.images[0], make_config(tmp_path, caption_strategy="filename"))
    assert [r.caption for r in scan_image_dataset(strategy).records] == ["img"]
    with pytest.raises(DatasetConfigError, match="instance_prompt"):
        resolve_dataset(plan.images[0], make_config(tmp_path, only_instance_prompt=True))


def test_multiline_file_gives_variants_and_disable_multiline_split_joins_them(tmp_path: Path) -> None:
    _captioned(tmp_path / "d", {"a": "first\n\n  second  \nthird\n"})
    record = _scan(tmp_path / "d").records[0]
    assert record.caption == "first" and record.captions == ("first", "second", "third")
    joined = _scan(tmp_path / "d", disable_multiline_split=True).records[0]
    assert joined.captions == ("first second third",)


def test_variant_per_epoch_is_a_pure_function_of_seed_epoch_and_path() -> None:
    variants = ("a", "b", "c")
    picks = [caption_for_epoch(variants, "a", 3, epoch, "x.png") for epoch in range(12)]
    assert picks == [caption_for_epoch(variants, "a", 3, epoch, "x.png") for epoch in range(12)]
    assert set(picks) == set(variants)
    assert caption_for_epoch((), "fallback", 3, 0, "x.png") == "fallback"


def test_training_data_caches_every_line_and_trains_one_per_epoch(tmp_path: Path) -> None:
    lines = ["a red square", "a square, red", "red square on white", "a small red block"]
    write_images(tmp_path / "d", 2)
    (tmp_path / "d" / "img_00.txt").write_text("\n".join(lines), encoding="utf-8")
    model = FakeModel()
    plan = make_plan(tmp_path, local("d", tmp_path / "d", repeats=1), text={"caption_filter_list": ["small "]})
    data = build_training_data(make_config(tmp_path), model, plan, show_progress=False)
    expected = {"a red square", "a square, red", "red square on white", "a red block"}
    assert expected <= set(model.prompts_encoded)  # every variant (filtered) is in the text cache
    per_epoch = []
    for _ in range(8):  # 2 images x 2 copies = 2 batches of 2 per epoch
        epoch_captions = set()
        for _ in range(data.sampler.batches_per_epoch()):
            batch = data.next_batch()
            epoch_captions |= {c for c, p in zip(batch["captions"], batch["paths"]) if p.endswith("img_00.png")}
        assert len(epoch_captions) == 1  # both copies of the image train on the same variant within an epoch
        per_epoch.append(epoch_captions.pop())
    assert len(set(per_epoch)) > 1 and set(per_epoch) <= expected
    again = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    replay = [again.next_batch()["captions"] for _ in range(8 * again.sampler.batches_per_epoch())]
    fresh = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    assert replay == [fresh.next_batch()["captions"] for _ in range(len(replay))]


def test_caption_rules_do_not_touch_the_instance_prompt_strategy(tmp_path: Path) -> None:
    _captioned(tmp_path / "d", {"a": "ignored"})
    result = _scan(tmp_path / "d", caption_strategy="instanceprompt", instance_prompt="sks dog",
                   prepend_instance_prompt=True)
    assert result.records[0].caption == "sks dog"
    assert CaptionRules(prepend=True, instance_prompt="p").apply("  x   y ") == "p x y"
