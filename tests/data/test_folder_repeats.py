"""``folder_repeats``: kohya's ``<N>_<words>`` subfolders become datasets repeated N times whose
uncaptioned images train on the folder's words."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections import Counter
from pathlib import Path

import pytest

from simpletuner.data.build import build_training_data
from simpletuner.data.config import DatasetConfigError
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images


def kohya_layout(root: Path) -> Path:
    write_images(root / "img" / "3_sks dog", 2, caption=None)  # no captions: the folder words are used
    write_images(root / "img" / "1_dog", 2, caption="a dog")  # captioned
    write_images(root / "img" / "loose", 2)  # not <N>_<words>: left out, as kohya does
    return root / "img"


def test_subfolders_become_datasets_with_their_repeats(tmp_path: Path):
    plan = make_plan(tmp_path, local("d", kohya_layout(tmp_path), folder_repeats=True))
    children = {cfg.id: cfg for cfg in plan.enabled_images}
    assert set(children) == {"d-1_dog", "d-3_sks-dog"}
    assert children["d-3_sks-dog"].repeats == 2 and children["d-1_dog"].repeats == 0
    data = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    seen = Counter()
    captions = {}
    for _ in range(data.sampler.batches_per_epoch()):
        batch = data.next_batch()
        for path, caption in zip(batch["paths"], batch["captions"]):
            seen[Path(path).parent.name] += 1
            captions[path] = caption
    assert seen == {"3_sks dog": 6, "1_dog": 2}  # 2 images x 3 passes, 2 images x 1 pass
    assert {c for p, c in captions.items() if "3_sks dog" in p} == {"sks dog"}
    assert {c for p, c in captions.items() if "1_dog" in p} == {"a dog 0", "a dog 1"}  # their own captions win


def test_a_folder_without_repeat_subfolders_is_refused(tmp_path: Path):
    write_images(tmp_path / "flat", 2)
    with pytest.raises(DatasetConfigError, match="dataset 'd'.*no subfolder named `<N>_<words>`"):
        make_plan(tmp_path, local("d", tmp_path / "flat", folder_repeats=True))


def test_repeats_and_folder_repeats_together_are_refused(tmp_path: Path):
    with pytest.raises(DatasetConfigError, match="folder_repeats takes the repeats from the subfolder names"):
        make_plan(tmp_path, local("d", kohya_layout(tmp_path), folder_repeats=True, repeats=2))


def test_a_zero_count_is_refused(tmp_path: Path):
    write_images(tmp_path / "img" / "0_cat", 1)
    with pytest.raises(DatasetConfigError, match="'0_cat' asks for 0 passes"):
        make_plan(tmp_path, local("d", tmp_path / "img", folder_repeats=True))
