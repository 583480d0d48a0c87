"""``caption_shuffle``: K shuffled variants per caption, the first ``keep_tokens`` tags in place,
each variant in the text cache under its own text, one trained per epoch."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

from simpletuner.data.build import build_training_data
from simpletuner.data.caption_variants import CaptionShuffle, parse_caption_shuffle, shuffled_variants
from simpletuner.data.config import DatasetConfigError
from simpletuner.data.scan_cache import scan_settings_fingerprint
from simpletuner.data.caption_rules import CaptionRules
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images

CAPTION = "ohwx woman, red hair, smiling, city park, golden hour, film grain"


def test_variants_differ_and_keep_the_leading_tags():
    variants = shuffled_variants(CAPTION, CaptionShuffle(variants=5, keep_tokens=2))
    assert len(variants) == 5 and len(set(variants)) == 5
    tags = [tag.strip() for tag in CAPTION.split(",")]
    for variant in variants:
        parts = variant.split(", ")
        assert parts[:2] == tags[:2]  # kept in place
        assert sorted(parts) == sorted(tags)  # the same tags, reordered
    assert variants == shuffled_variants(CAPTION, CaptionShuffle(variants=5, keep_tokens=2))  # deterministic
    assert variants != shuffled_variants(CAPTION, CaptionShuffle(variants=5, keep_tokens=2, seed=1))


def test_short_captions_give_the_orders_they_have():
    assert set(shuffled_variants("a, b, c", CaptionShuffle(variants=10, keep_tokens=1))) == {"a, b, c", "a, c, b"}
    assert shuffled_variants("one tag only", CaptionShuffle(variants=4)) == ("one tag only",)
    assert shuffled_variants("a | b", CaptionShuffle(variants=2, separator="|")) in (("a | b", "b | a"),
                                                                                   ("b | a", "a | b"))


@pytest.mark.parametrize("value, words", [
    ({"variants": 0}, "'variants' has value 0"), ({"keep": 1}, "unknown key 'keep'"),
    ({"separator": ""}, "non-blank"), ({"variants": True}, "whole number"),
])
def test_bad_settings_are_refused_with_the_key(value, words):
    with pytest.raises(DatasetConfigError, match=words):
        parse_caption_shuffle(value, "dataset 'd'")


def test_the_dataset_file_refuses_a_bad_caption_shuffle(tmp_path: Path):
    write_images(tmp_path / "d", 1)
    with pytest.raises(DatasetConfigError, match="dataset 'd'.*caption_shuffle key 'keep_tokens' has value -1"):
        make_plan(tmp_path, local("d", tmp_path / "d", caption_shuffle={"keep_tokens": -1}))


def test_every_variant_is_cached_and_one_is_trained_per_epoch(tmp_path: Path):
    write_images(tmp_path / "d", 2, caption=None)
    for index in range(2):
        (tmp_path / "d" / f"img_{index:02d}.txt").write_text(f"{CAPTION}, take {index}", encoding="utf-8")
    model = FakeModel()
    plan = make_plan(tmp_path, local("d", tmp_path / "d", caption_shuffle={"variants": 3, "keep_tokens": 1}))
    data = build_training_data(make_config(tmp_path), model, plan, show_progress=False)
    expected = set(shuffled_variants(f"{CAPTION}, take 0", CaptionShuffle(variants=3, keep_tokens=1)))
    assert expected <= set(model.prompts_encoded)  # each variant has its own text-cache entry
    assert f"{CAPTION}, take 0" not in model.prompts_encoded or f"{CAPTION}, take 0" in expected
    trained = set()
    for _ in range(12):
        batch = data.next_batch()
        trained |= {c for c, p in zip(batch["captions"], batch["paths"]) if p.endswith("img_00.png")}
    assert len(trained) > 1 and trained <= expected
    assert all(caption.startswith("ohwx woman, ") for caption in trained)


def test_the_stored_scan_is_redone_when_the_shuffle_changes(tmp_path: Path):
    write_images(tmp_path / "d", 1)
    plain = make_plan(tmp_path, local("d", tmp_path / "d")).images[0]
    shuffled = make_plan(tmp_path, local("d", tmp_path / "d", caption_shuffle={"variants": 2})).images[0]
    other = make_plan(tmp_path, local("d", tmp_path / "d", caption_shuffle={"variants": 3})).images[0]
    prints = {scan_settings_fingerprint(cfg, CaptionRules.for_dataset(cfg)) for cfg in (plain, shuffled, other)}
    assert len(prints) == 3
