"""Several datasets: draw proportions, step windows, subsets, and exact resume of the mixed order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from simpletuner.data.config import DatasetConfigError, parse_dataset_plan
from simpletuner.data.metadata import ImageRecord
from simpletuner.data.mixing import DatasetMixer, DatasetSchedule, dataset_weight
from simpletuner.data.sampler import BucketBatchSampler


def records(dataset: str, count: int) -> list[ImageRecord]:
    return [ImageRecord(Path(f"{dataset}/{i}.png"), 64, 64, "c", dataset) for i in range(count)]


def mixer(schedules: dict[str, DatasetSchedule], sizes: dict[str, int], seed: int = 0) -> DatasetMixer:
    samplers = {name: BucketBatchSampler({(64, 64): records(name, n)}, 2, seed=seed) for name, n in sizes.items()}
    return DatasetMixer(samplers, schedules, seed=seed)


def test_weights_by_mode():
    assert dataset_weight("auto-weighting", 1.0, 300, 0) == 300
    assert dataset_weight("auto-weighting", 0.5, 100, 1) == 100
    assert dataset_weight("uniform", 0.5, 100, 1) == 0.5
    with pytest.raises(ValueError, match="auto-weighting"):
        dataset_weight("size", 1, 1, 0)


def test_draw_proportions_follow_weights_over_many_draws():
    mix = mixer({"big": DatasetSchedule(300.0), "small": DatasetSchedule(100.0)}, {"big": 30, "small": 10})
    counts = Counter(mix.next_batch(0)[0].dataset_id for _ in range(8000))
    assert abs(counts["big"] / 8000 - 0.75) < 0.02
    uniform = mixer({"big": DatasetSchedule(1.0), "small": DatasetSchedule(1.0)}, {"big": 30, "small": 10})
    counts = Counter(uniform.next_batch(0)[0].dataset_id for _ in range(8000))
    assert abs(counts["small"] / 8000 - 0.5) < 0.02


def test_batches_never_mix_datasets_and_zero_probability_is_never_drawn():
    mix = mixer({"a": DatasetSchedule(1.0), "b": DatasetSchedule(0.0)}, {"a": 6, "b": 6})
    batches = [mix.next_batch(0) for _ in range(200)]
    assert all({r.dataset_id for r in batch} == {"a"} for batch in batches)


def test_step_windows():
    mix = mixer({"early": DatasetSchedule(1.0, end_step=10), "late": DatasetSchedule(1.0, start_step=10)},
                {"early": 4, "late": 4})
    assert {mix.next_batch(step)[0].dataset_id for step in range(10) for _ in range(5)} == {"early"}
    assert {mix.next_batch(step)[0].dataset_id for step in range(10, 20) for _ in range(5)} == {"late"}
    gap = mixer({"only": DatasetSchedule(1.0, start_step=5)}, {"only": 4})
    with pytest.raises(RuntimeError, match="no dataset is active at step 2"):
        gap.next_batch(2)


def test_resume_continues_the_exact_mixed_sequence():
    schedules = {"a": DatasetSchedule(3.0), "b": DatasetSchedule(1.0)}
    reference = mixer(schedules, {"a": 9, "b": 5}, seed=4)
    expected = [[r.path for r in reference.next_batch(s)] for s in range(40)]
    first = mixer(schedules, {"a": 9, "b": 5}, seed=4)
    for step in range(17):
        first.next_batch(step)
    resumed = mixer(schedules, {"a": 9, "b": 5}, seed=4)
    resumed.load_state_dict(first.state_dict())
    assert [[r.path for r in resumed.next_batch(s)] for s in range(17, 40)] == expected[17:]
    other = mixer({"a": DatasetSchedule(1.0)}, {"a": 9})
    with pytest.raises(ValueError, match="same multidatabackend.json"):
        other.load_state_dict(first.state_dict())


@pytest.mark.parametrize("extra, message", [
    ({"probability": -1}, "key 'probability' has value -1"),
    ({"max_num_samples": 0}, "use 1 or more"),
    ({"start_step": 5, "end_step": 5}, "must be greater than 'start_step'"),
    ({"end_step": "ten"}, "expected an integer or null"),
])
def test_sampling_keys_are_validated(tmp_path, extra, message):
    entries = [{"id": "img", "type": "local", "instance_data_dir": str(tmp_path), **extra},
               {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "t")}]
    with pytest.raises(DatasetConfigError, match=message):
        parse_dataset_plan(entries, "datasets.json")


def test_subset_is_seeded_and_keeps_scan_order():
    from simpletuner.data.config import ImageDatasetConfig
    from simpletuner.data.build import _subset

    cfg = ImageDatasetConfig(id="d", type="local", instance_data_dir=".", max_num_samples=5)
    pool = records("d", 20)
    chosen = _subset(pool, cfg, seed=1)
    assert len(chosen) == 5 and chosen == sorted(chosen, key=pool.index)
    assert _subset(pool, cfg, seed=1) == chosen
    assert _subset(pool, cfg, seed=2) != chosen
    assert _subset(pool[:3], cfg, seed=1) == pool[:3]


def test_crop_anchor_moves_the_window(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from simpletuner.data.images import load_image_tensor

    image = Image.new("RGB", (128, 64), "black")
    image.paste((255, 255, 255), (64, 0, 128, 64))  # right half white
    path = tmp_path / "halves.png"
    image.save(path)
    left = load_image_tensor(path, (64, 64), anchor=(0.0, 0.5))
    right = load_image_tensor(path, (64, 64), anchor=(1.0, 0.5))
    assert float(left.mean()) == pytest.approx(-1.0, abs=0.02)
    assert float(right.mean()) == pytest.approx(1.0, abs=0.02)
    assert torch.equal(load_image_tensor(path, (64, 64)), load_image_tensor(path, (64, 64), anchor=(0.5, 0.5)))
