"""The demo dataset, its scorer, the offline tokenizer and the tiny model builder."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from simpletuner.testing.shapes import PALETTE, SHAPES, make_demo_dataset, parse_caption, read_image, score_samples

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_demo_dataset_is_balanced_and_captioned(tmp_path):
    paths = make_demo_dataset(tmp_path, 36, size=64, seed=1)
    assert len(paths) == 36 and all(p.suffix == ".png" for p in paths)
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    colours = [parse_caption(c).colour for c in captions]
    assert {c: colours.count(c) for c in PALETTE} == {c: 6 for c in PALETTE}
    assert all(c.endswith("on a white background") for c in captions)
    assert Image.open(paths[0]).size == (64, 64)


def test_scorer_reads_the_dataset_perfectly_and_rejects_wrong_prompts(tmp_path):
    paths = make_demo_dataset(tmp_path, 54, size=64, seed=2)
    images = [Image.open(p) for p in paths]
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    exact = score_samples(images, captions)
    assert exact.colour == 1.0 and exact.shape >= 0.95
    rotated = captions[1:] + captions[:1]  # neighbours rarely share colour and shape
    wrong = score_samples(images, rotated)
    assert wrong.colour < 0.4


def test_blank_image_has_no_colour():
    reading = read_image(Image.new("RGB", (64, 64), "white"))
    assert reading.colour is None and reading.shape is None and reading.foreground_fraction == 0.0


def test_tokenizer_keeps_demo_words_whole():
    pytest.importorskip("transformers")
    from simpletuner.testing.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    for word in [*PALETTE, *SHAPES, "background"]:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} split into {tokenizer.convert_ids_to_tokens(ids)}"
    assert tokenizer.decode(tokenizer("hello world").input_ids, skip_special_tokens=True) == "hello world"


@pytest.mark.parametrize("family, prediction", [("sd1x", "epsilon"), ("sd2x", "v_prediction")])
def test_tiny_model_folder_loads_with_diffusers(tmp_path, family, prediction):
    pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    from simpletuner.testing.tiny_models import make_tiny_model

    report = make_tiny_model(family, tmp_path / family)
    assert report.vae_psnr_db > 28, "the shipped demo VAE must reconstruct the shapes"
    assert sum(report.parameters.values()) < 3_000_000
    scheduler = json.loads((tmp_path / family / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / family)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert (tmp_path / family / "tokenizer" / "vocab.json").is_file()
