"""build_training_data / TrainingData: batches of cached tensors, reuse across runs, resume."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub; set before diffusers is imported

from pathlib import Path

import pytest
import torch
from PIL import Image

from simpletuner.data.config import parse_dataset_plan
from simpletuner.data.dataset import bucket_alignment, build_training_data
from simpletuner.testing.shapes import make_demo_dataset

SQUARE = 6
TALL = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, loaded model) built once for the module."""
    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model("sd1x", folder)
    family = StableDiffusion1x(_config(folder, folder.parent), torch.device("cpu"), torch.float32)
    family.load()
    return folder, family


def _config(model_folder: Path, root: Path, **extra):
    from simpletuner.options.resolve import merge_sources

    values = {"model_family": "sd1x", "output_dir": str(root / "out"),
              "pretrained_model_name_or_path": str(model_folder), "resolution": 64,
              "resolution_type": "pixel", "cache_dir": str(root / "cache"), "train_batch_size": 2,
              "seed": 3, "vae_batch_size": 4, **extra}
    return merge_sources({}, values, "test", [])


def _workspace(tmp_path: Path):
    """Six 64x64 shapes plus two 64x96 images (a second bucket), and the dataset plan."""
    data = tmp_path / "data"
    make_demo_dataset(data, SQUARE, size=64)
    for index in range(TALL):
        Image.new("RGB", (64, 96), (30, 60, 220)).save(data / f"tall_{index}.png")
        (data / f"tall_{index}.txt").write_text("a tall blue picture\n", encoding="utf-8")
    plan = parse_dataset_plan([
        {"id": "shapes", "type": "local", "instance_data_dir": str(data)},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "text")},
    ])
    return data, plan


def test_bucket_alignment_rule() -> None:
    assert bucket_alignment(64, 4, 64.0) == 64  # a 64 px dataset keeps 64x64 buckets
    assert bucket_alignment(64, 4, 32.0) == 8  # smaller than the alignment: 2 * vae scale
    assert bucket_alignment(2, 8, 512.0) == 8  # never below the VAE scale factor
    assert bucket_alignment(8, 16, 512.0) == 16  # nor below a transformer patch (SD3: 2 x 2 cells of 8 px)


def test_next_batch_shapes_keys_and_single_bucket(tmp_path: Path, tiny) -> None:
    folder, model = tiny
    data, plan = _workspace(tmp_path)
    training = build_training_data(_config(folder, tmp_path), model, plan, show_progress=False)
    summary = training.summaries[0]
    assert summary.found == SQUARE + TALL and summary.skipped == []
    assert summary.buckets == {(64, 64): SQUARE, (64, 128): TALL}
    assert (summary.latents_built, summary.latents_reused) == (SQUARE + TALL, 0)
    empty = training.text_cache.load("")["prompt_embeds"]
    for _ in range(2 * training.sampler.batches_per_epoch()):
        batch = training.next_batch()
        assert set(batch) == {"latent_mean", "latent_std", "prompt_embeds", "empty_prompt", "captions", "paths",
                              "dataset_id", "is_regularisation_data", "original_size", "crop_top_left", "target_size"}
        assert batch["dataset_id"] == "shapes" and batch["is_regularisation_data"] is False
        width, height = (64, 128) if "tall" in batch["paths"][0] else (64, 64)
        assert all(("tall" in path) == (height == 128) for path in batch["paths"])
        assert batch["latent_mean"].shape == (2, 4, height // 4, width // 4)
        assert batch["latent_std"].shape == batch["latent_mean"].shape
        assert batch["prompt_embeds"].shape == (2, 77, 64)
        assert set(batch["empty_prompt"]) == {"prompt_embeds"}
        assert batch["empty_prompt"]["prompt_embeds"].shape == (2, 77, 64)
        assert torch.equal(batch["empty_prompt"]["prompt_embeds"][1], empty)
        assert len(batch["captions"]) == len(batch["paths"]) == 2


def test_second_build_reuses_caches_and_says_so(tmp_path: Path, tiny, caplog) -> None:
    folder, model = tiny
    _, plan = _workspace(tmp_path)
    config = _config(folder, tmp_path)
    first = build_training_data(config, model, plan, show_progress=False)
    first_batch = first.next_batch()
    with caplog.at_level(logging.INFO, logger="simpletuner.data"):
        second = build_training_data(config, model, plan, show_progress=False)
    assert (second.summaries[0].latents_built, second.summaries[0].latents_reused) == (0, SQUARE + TALL)
    assert (second.text_report.built, second.text_report.reused) == (0, first.text_report.built)
    assert f"latents: {SQUARE + TALL} reused, 0 built" in caplog.text
    description = second.describe()
    assert "64x64: 6" in description and "64x128: 2" in description
    assert f"latents: {SQUARE + TALL} reused, 0 built" in description
    second_batch = second.next_batch()  # same seed: same order, same cached values
    assert second_batch["paths"] == first_batch["paths"]
    assert torch.equal(second_batch["latent_mean"], first_batch["latent_mean"])


def test_corrupt_image_is_skipped_and_training_continues(tmp_path: Path, tiny, caplog) -> None:
    folder, model = tiny
    data, plan = _workspace(tmp_path)
    broken = sorted(data.glob("0*.png"))[0]
    content = broken.read_bytes()
    broken.write_bytes(content[: len(content) // 2])
    with caplog.at_level(logging.WARNING):
        training = build_training_data(_config(folder, tmp_path), model, plan, show_progress=False)
    summary = training.summaries[0]
    assert [path for path, _ in summary.skipped] == [broken]
    assert summary.buckets[(64, 64)] == SQUARE - 1
    assert broken.name in training.describe()
    assert sum(broken.name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
    seen = {path for _ in range(3 * training.sampler.batches_per_epoch()) for path in training.next_batch()["paths"]}
    assert str(broken) not in seen


def test_state_dict_resumes_the_batch_order(tmp_path: Path, tiny) -> None:
    folder, model = tiny
    _, plan = _workspace(tmp_path)
    config = _config(folder, tmp_path)
    training = build_training_data(config, model, plan, show_progress=False)
    for _ in range(3):
        training.next_batch()
    state = training.state_dict()
    expected = [training.next_batch()["paths"] for _ in range(4)]
    resumed = build_training_data(config, model, plan, show_progress=False)
    resumed.next_batch()  # a live iterator must not survive load_state_dict
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["paths"] for _ in range(4)] == expected
