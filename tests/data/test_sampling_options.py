"""Repeats, oversubscription, bucket pruning and rounding, regularisation batches, the start-up table."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from simpletuner.data.build import build_training_data
from simpletuner.data.config import parse_dataset_plan
from simpletuner.data.dataset import NoTrainingDataError
from simpletuner.data.geometry import buckets_of, place_images
from simpletuner.data.metadata import ImageRecord
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images


def _epoch_counts(data) -> Counter:
    return Counter(path for _ in range(data.sampler.batches_per_epoch()) for path in data.next_batch()["paths"])


def test_repeats_zero_means_once_and_two_means_three_times(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 4)
    for repeats, copies in ((0, 1), (2, 3)):
        plan = make_plan(tmp_path, local("d", tmp_path / "d", repeats=repeats))
        data = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
        assert set(_epoch_counts(data).values()) == {copies}


def test_too_small_dataset_fails_unless_oversubscription_raises_repeats(tmp_path: Path, caplog) -> None:
    write_images(tmp_path / "d", 3)
    plan = make_plan(tmp_path, local("d", tmp_path / "d"))
    with pytest.raises(NoTrainingDataError, match=r"4 processes need one each .*\"repeats\": 2.*"
                                                  r"--allow_dataset_oversubscription"):
        build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False, num_processes=4)
    config = make_config(tmp_path, allow_dataset_oversubscription=True)
    with caplog.at_level(logging.WARNING, logger="simpletuner.data"):
        data = build_training_data(config, FakeModel(), plan, show_progress=False, num_processes=4)
    assert "repeats raised from 0 to 2" in caplog.text
    assert data.summaries[0].repeats == 2 and data.sampler.batches_per_epoch() == 4  # 3 x 3 copies // 2
    assert "raised from 0 by --allow_dataset_oversubscription" in data.describe()
    explicit = make_plan(tmp_path, local("d", tmp_path / "d", repeats=0))
    with pytest.raises(NoTrainingDataError, match="leaves repeats set by hand alone"):
        build_training_data(config, FakeModel(), explicit, show_progress=False, num_processes=4)


def test_batch_larger_than_every_bucket_keeps_its_message_and_oversubscription_fills_it(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 3)
    plan = make_plan(tmp_path, local("d", tmp_path / "d"))
    with pytest.raises(NoTrainingDataError, match=r"`--train_batch_size 8` is larger than every aspect bucket"):
        build_training_data(make_config(tmp_path, train_batch_size=8), FakeModel(), plan, show_progress=False)
    data = build_training_data(make_config(tmp_path, train_batch_size=8, allow_dataset_oversubscription=True),
                               FakeModel(), plan, show_progress=False)
    assert data.summaries[0].repeats == 2 and len(data.next_batch()["paths"]) == 8


def test_disable_bucket_pruning_keeps_a_bucket_smaller_than_a_batch(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 4)
    Image.new("RGB", (64, 96), (0, 0, 200)).save(tmp_path / "d" / "tall.png")
    (tmp_path / "d" / "tall.txt").write_text("a tall picture", encoding="utf-8")
    plan = make_plan(tmp_path, local("d", tmp_path / "d"))
    pruned = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    assert "tall" not in " ".join(_epoch_counts(pruned)) and pruned.sampler.samplers["d"].dropped_records() == 1
    kept = build_training_data(make_config(tmp_path, disable_bucket_pruning=True), FakeModel(), plan,
                               show_progress=False)
    assert kept.sampler.batches_per_epoch() == 3
    tall = [b for b in (kept.next_batch() for _ in range(3)) if "tall" in b["paths"][0]]
    assert len(tall) == 1 and tall[0]["paths"] == [str(tmp_path / "d" / "tall.png")] * 2  # filled to batch size
    assert tall[0]["latent_mean"].shape == (2, 3, 16, 8)


def test_aspect_bucket_rounding_merges_near_equal_aspects() -> None:
    cfg = parse_dataset_plan([{"id": "d", "type": "local", "instance_data_dir": ".", "resolution": 64,
                               "resolution_type": "pixel"},
                              {"id": "t", "dataset_type": "text_embeds", "cache_dir": "x"}]).images[0]
    records = [ImageRecord(Path("a.png"), 100, 67, "a", "d"), ImageRecord(Path("b.png"), 100, 66, "b", "d")]
    assert sorted(buckets_of(place_images(records, cfg, 64)[0])) == [(64, 64), (128, 64)]
    assert list(buckets_of(place_images(records, cfg, 64, rounding=1)[0])) == [(128, 64)]


def test_regularisation_batches_are_marked(tmp_path: Path) -> None:
    write_images(tmp_path / "subject", 2)
    write_images(tmp_path / "prior", 2, prefix="prior")
    plan = make_plan(tmp_path, local("subject", tmp_path / "subject"),
                     local("prior", tmp_path / "prior", is_regularization_data=True))
    data = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    batches = [data.next_batch() for _ in range(12)]
    flags = {batch["dataset_id"]: batch["is_regularisation_data"] for batch in batches}
    assert flags == {"subject": False, "prior": True}
    assert "prior | regularisation" in data.describe()


def test_describe_prints_a_table_with_samples_and_skip_reasons(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 4)
    write_images(tmp_path / "d", 1, caption=None, prefix="nocaption")
    (tmp_path / "d" / "broken.png").write_bytes(b"not an image")
    plan = make_plan(tmp_path, local("d", tmp_path / "d", repeats=1))
    text = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False).describe()
    lines = text.splitlines()
    assert lines[0] == "dataset | role | found | used | skipped | buckets | samples/epoch | batches/epoch"
    assert lines[1] == "d | image | 6 | 4 | 2 | 1 | 8 | 4"
    assert "2 skipped (unreadable 1, no caption 1)" in text or "2 skipped (no caption 1, unreadable 1)" in text
    assert "repeats 1, samples per epoch 8, batches per epoch: 4" in text
