"""``--enable_watermark``: the written validation images carry the SDXL reference mark (decoded back
from the PNG on disk), images too small for the encoder are written as they were, nothing is marked
without the option (not even by SDXL's own pipeline watermarker), and the rules refuse what cannot work."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.validation.test_validation_extras import family_model, pixels, validate
from tests.validation.test_validation_rules import error_of, resolve

pytest.importorskip("imwatermark")


def test_rules_name_the_extra_and_refuse_video(tmp_path, monkeypatch):
    assert resolve(tmp_path, enable_watermark="true").config.enable_watermark is True
    assert "whose compression would wipe the mark" in error_of(tmp_path, "wan", enable_watermark="true")
    monkeypatch.setattr("simpletuner.validation.watermark.watermark_available", lambda: False)
    message = error_of(tmp_path, enable_watermark="true")
    assert "pip install 'simpletuner[watermark]'" in message and "`--enable_watermark`" in message


def test_written_images_carry_the_mark_and_barely_change(tmp_path):
    from PIL import Image

    from simpletuner.validation.watermark import read_watermark, watermark_bits

    model, config = family_model("sd1x", tmp_path / "model", edge=256, validation_prompt="a red square",
                                 validation_num_inference_steps=2)
    plain = Image.open(validate(model, config, tmp_path / "plain", edge=256) / "256x256_00.png")
    marked_folder = validate(model, config.replace(enable_watermark=True), tmp_path / "marked", edge=256)
    marked = Image.open(marked_folder / "256x256_00.png")
    assert read_watermark(marked) == watermark_bits()
    assert read_watermark(plain) != watermark_bits()
    difference = np.abs(pixels(marked_folder / "256x256_00.png") - np.asarray(plain.convert("RGB")).astype(int))
    assert 0 < difference.mean() < 4  # invisible: a few levels on average, but there
    assert (marked_folder / "grid_256x256.png").is_file()


def test_small_images_are_written_unmarked_and_logged(tmp_path, caplog):
    model, config = family_model("sd1x", tmp_path / "model", validation_prompt="a red square",
                                 validation_num_inference_steps=2)
    plain = validate(model, config, tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="simpletuner.validation.watermark"):
        marked = validate(model, config.replace(enable_watermark=True), tmp_path / "marked")
    assert np.array_equal(pixels(marked / "64x64_00.png"), pixels(plain / "64x64_00.png"))
    assert "64x64 images are below the watermark's minimum" in caplog.text


def test_sdxl_pipeline_adds_no_watermark_of_its_own(tmp_path):
    model, _ = family_model("sdxl", tmp_path / "model")
    assert model.build_pipeline().watermark is None
