"""Conditioning datasets (masks and control images cropped like their images) and eval datasets."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpletuner.data.build import build_training_data
from simpletuner.data.conditioning import pair_keys
from simpletuner.data.config import DatasetConfigError
from simpletuner.data.images import load_image_tensor
from tests.data.fake_model import FakeModel, local, make_config, make_plan

COUNT = 4
#: Crop 32x32 windows out of 96x64 pictures (resized to 48x32 first): 16 px of horizontal slack.
IMAGE_ENTRY = {"crop": True, "crop_style": "random", "resolution": 32}


def _pictures(folder: Path, count: int = COUNT) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        red = np.tile((np.arange(96) * 2 + index * 9).astype(np.uint8), (64, 1))
        pixels = np.stack([red, np.full_like(red, 40 * index), red[:, ::-1]], axis=-1)
        path = folder / f"photo_{index}.png"
        Image.fromarray(pixels).save(path)
        path.with_suffix(".txt").write_text(f"photo {index}", encoding="utf-8")
        paths.append(path)
    return paths


def _masks(folder: Path, count: int = COUNT, size: tuple[int, int] = (96, 64)) -> None:
    """Left half white (train), right half black, at ``size``; saved as .jpg so pairing goes by stem."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        mask[:, : size[0] // 2] = 255
        Image.fromarray(mask).save(folder / f"photo_{index}.jpg", quality=100)


def _plan(tmp_path: Path, conditioning: list[str], extra: list[dict], **image_keys):
    return make_plan(tmp_path, local("photos", tmp_path / "photos", conditioning_data=conditioning,
                                     **IMAGE_ENTRY, **image_keys), *extra)


def _cond(name: str, folder: Path, kind: str) -> dict:
    return {"id": name, "type": "local", "dataset_type": "conditioning", "instance_data_dir": str(folder),
            "conditioning_type": kind}


def test_pairing_by_relative_path_then_by_stem() -> None:
    pairs = pair_keys(["a/x.jpg", "a/y.jpg", "z.png"], ["a/x.jpg", "a/y.png", "a/y.webp", "other.png"])
    assert pairs == {"a/x.jpg": "a/x.jpg", "a/y.jpg": "a/y.png"}


def test_mask_batches_are_cropped_with_the_image_crop_box(tmp_path: Path) -> None:
    images = _pictures(tmp_path / "photos")
    _masks(tmp_path / "masks", size=(48, 32))  # half resolution: still the same box
    plan = _plan(tmp_path, ["masks"], [_cond("masks", tmp_path / "masks", "mask")])
    data = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    cache = data.latent_caches["photos"]
    anchors = {str(r.path): cache.anchor_of(r) for r in data.roles["photos"].records}
    assert len({a for a in anchors.values()}) > 1  # random windows: the test would be blind otherwise
    for _ in range(data.sampler.batches_per_epoch()):
        batch = data.next_batch()
        assert batch["dataset_id"] == "photos"
        mask = batch["mask"]
        assert mask.shape == (2, 1, 32, 32) and mask.dtype == torch.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        for sample, path in zip(mask, batch["paths"]):
            left = int(16 * anchors[path][0])  # crop offset inside the 48x32 resized picture
            edge = 24 - left  # white columns end here in the crop
            assert torch.all(sample[0, :, : edge - 2] > 0.95) and torch.all(sample[0, :, edge + 2:] < 0.05)
    assert {str(p) for p in images} == set(anchors)


def test_control_images_match_the_image_pixels_exactly(tmp_path: Path) -> None:
    images = _pictures(tmp_path / "photos")
    (tmp_path / "control").mkdir()
    for path in images:
        (tmp_path / "control" / path.name).write_bytes(path.read_bytes())
    plan = _plan(tmp_path, ["control"], [_cond("control", tmp_path / "control", "controlnet")])
    data = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    cache = data.latent_caches["photos"]
    records = {str(r.path): r for r in data.roles["photos"].records}
    batch = data.next_batch()
    assert batch["conditioning_pixels"].shape == (2, 3, 32, 32)
    for pixels, path in zip(batch["conditioning_pixels"], batch["paths"]):
        expected = load_image_tensor(Path(path), (32, 32), anchor=cache.anchor_of(records[path]))
        assert torch.equal(pixels, expected)


def test_unpaired_images_are_skipped_and_conditioning_is_never_sampled_alone(tmp_path: Path) -> None:
    _pictures(tmp_path / "photos", COUNT + 1)
    _masks(tmp_path / "masks")  # no mask for photo_4
    plan = _plan(tmp_path, "masks", [_cond("masks", tmp_path / "masks", "mask")])
    data = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    summary = data.summaries[0]
    assert [Path(p).name for p, _ in summary.skipped] == ["photo_4.png"]
    assert "no conditioning image" in summary.skipped[0][1] and summary.conditioning == ("masks",)
    assert set(data.sampler.samplers) == {"photos"}
    assert "conditioning: masks (combined)" in data.describe()


def test_combined_and_random_multidataset_sampling(tmp_path: Path) -> None:
    images = _pictures(tmp_path / "photos")
    _masks(tmp_path / "masks")
    for name, transform in (("edges", lambda a: a), ("inverted", lambda a: 255 - a)):
        (tmp_path / name).mkdir()
        for path in images:
            Image.fromarray(transform(np.asarray(Image.open(path)))).save(tmp_path / name / path.name)
    conds = [_cond("masks", tmp_path / "masks", "mask"), _cond("edges", tmp_path / "edges", "controlnet"),
             _cond("inverted", tmp_path / "inverted", "controlnet")]
    combined = build_training_data(make_config(tmp_path), FakeModel(),
                                   _plan(tmp_path, ["masks", "edges"], conds), show_progress=False).next_batch()
    assert [c["dataset_id"] for c in combined["conditioning"]] == ["masks", "edges"]
    assert combined["mask"].shape == (2, 1, 32, 32) and combined["conditioning_pixels"].shape == (2, 3, 32, 32)
    assert torch.equal(combined["conditioning"][1]["pixels"], combined["conditioning_pixels"])

    config = make_config(tmp_path, conditioning_multidataset_sampling="random")
    plan = _plan(tmp_path, ["edges", "inverted"], conds)
    data = build_training_data(config, FakeModel(), plan, show_progress=False)
    chosen = [batch["conditioning_dataset_ids"] for batch in (data.next_batch() for _ in range(8))]
    assert {name for ids in chosen for name in ids} == {"edges", "inverted"}
    again = build_training_data(config, FakeModel(), plan, show_progress=False)
    assert [again.next_batch()["conditioning_dataset_ids"] for _ in range(8)] == chosen
    with pytest.raises(DatasetConfigError, match="share one conditioning_type"):
        build_training_data(config, FakeModel(), _plan(tmp_path, ["masks", "edges"], conds), show_progress=False)


def test_conditioning_config_rules(tmp_path: Path) -> None:
    _pictures(tmp_path / "photos", 1)
    with pytest.raises(DatasetConfigError, match="names 'nope', which is not in the file"):
        _plan(tmp_path, ["nope"], [])
    with pytest.raises(DatasetConfigError, match="has dataset_type 'image'"):
        _plan(tmp_path, ["other"], [local("other", tmp_path / "photos")])
    with pytest.raises(DatasetConfigError, match="conditioning_type"):
        _plan(tmp_path, ["masks"], [_cond("masks", tmp_path / "photos", "depthmap")])
    with pytest.raises(DatasetConfigError, match="only applies to"):
        make_plan(tmp_path, local("photos", tmp_path / "photos", conditioning_type="mask"))


def test_eval_datasets_are_cached_but_never_trained_on(tmp_path: Path) -> None:
    _pictures(tmp_path / "photos")
    _pictures(tmp_path / "held_out", 3)
    plan = make_plan(tmp_path, local("photos", tmp_path / "photos"),
                     {**local("holdout", tmp_path / "held_out"), "dataset_type": "eval"})
    data = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    assert set(data.sampler.samplers) == {"photos"}
    assert {data.next_batch()["dataset_id"] for _ in range(20)} == {"photos"}
    batches = list(data.eval_batches("holdout", batch_size=2))
    assert [len(b["paths"]) for b in batches] == [2, 1] and all(b["dataset_id"] == "holdout" for b in batches)
    held_out = sorted(str(p) for p in (tmp_path / "held_out").glob("*.png"))
    assert sorted(p for b in batches for p in b["paths"]) == held_out
    assert [b["paths"] for b in data.eval_batches(batch_size=2)] == [b["paths"] for b in batches]
    assert "holdout | eval | 3 | 3" in data.describe()
