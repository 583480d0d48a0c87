"""The nasty-file corpus: every awkward file is used correctly or skipped once with a reason.

The corpus (``nasty_corpus.py``) is generated into a temporary folder; each case states its
expected outcome. Nothing on disk may change, a decompression bomb is refused from its header
without a memory spike, and each skipped file gets exactly one log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tracemalloc
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the end-to-end test builds a tiny local model; never a hub

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from simpletuner.data.captions import decode_caption_bytes
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.images import (
    MAX_IMAGE_PIXELS,
    CorruptImageError,
    ImageTooLargeError,
    load_image_tensor,
)
from simpletuner.data.metadata import IMAGE_EXTENSIONS, ScanResult, scan_image_dataset
from tests.data.nasty_corpus import Expectation, build_nasty_corpus, case_names, webp_supported

CASES = case_names()
PEAK_MEMORY_LIMIT = 50 * 1024 * 1024

Corpus = tuple[Path, dict[str, Expectation]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """(folder, expectations) for the whole corpus: Corpus, generated once per module."""
    folder = tmp_path_factory.mktemp("nasty")
    return folder, build_nasty_corpus(folder)


@pytest.fixture(scope="module")
def scanned(corpus: Corpus) -> ScanResult:
    folder, _ = corpus
    return scan_image_dataset(_cfg(folder))


def _cfg(folder: Path) -> ImageDatasetConfig:
    return ImageDatasetConfig(id="nasty", type="local", instance_data_dir=str(folder))


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """{relative path: (size, mtime_ns, sha256)} of every file under ``folder``."""
    snapshot = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            snapshot[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns, digest)
    return snapshot


def _as_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] back to (H, W, 3) uint8, as the pixels were in the file."""
    return ((tensor.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


# --- the corpus itself ---------------------------------------------------------------------------


def test_corpus_covers_every_case_and_stored_modes(corpus: Corpus) -> None:
    folder, expectations = corpus
    assert set(expectations) == set(CASES)
    assert ".gif" in IMAGE_EXTENSIONS
    for name, expectation in expectations.items():
        if expectation.mode is not None:  # the file really exercises the conversion it names
            with Image.open(folder / name) as image:
                assert image.mode == expectation.mode, name
    with Image.open(folder / "animated.gif") as image:
        assert image.n_frames == 3


# --- the scan ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_outcome(name: str, corpus: Corpus, scanned: ScanResult) -> None:
    _, expectations = corpus
    expectation = expectations[name]
    records = {record.path.name: record for record in scanned.records}
    reasons = {path.name: reason for path, reason in scanned.skipped}
    if expectation.outcome == "skipped":
        assert name not in records, expectation.why
        for part in expectation.reason:
            assert part in reasons[name], f"{expectation.why}: {reasons[name]!r} lacks {part!r}"
    else:
        assert name not in reasons, f"{expectation.why}: skipped with {reasons.get(name)!r}"
        record = records[name]
        assert (record.width, record.height) == expectation.size, expectation.why
        assert record.caption == expectation.caption, expectation.why


def test_scan_lists_each_file_once(corpus: Corpus, scanned: ScanResult) -> None:
    _, expectations = corpus
    names = [record.path.name for record in scanned.records] + [path.name for path, _ in scanned.skipped]
    assert sorted(names) == sorted(expectations)


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_decode_outcome(name: str, corpus: Corpus, scanned: ScanResult) -> None:
    """Used files decode to the expected pixels; the decoder refuses what the scan refused."""
    folder, expectations = corpus
    expectation = expectations[name]
    if expectation.outcome == "skipped":
        reason = {path.name: why for path, why in scanned.skipped}[name]
        if "caption" not in reason:  # a good image skipped for its caption decodes fine
            with pytest.raises(CorruptImageError, match=name.replace(".", r"\.")):
                load_image_tensor(folder / name, (8, 8))
        return
    if expectation.outcome == "decode_error":
        with pytest.raises(CorruptImageError) as raised:
            load_image_tensor(folder / name, expectation.size)
        for part in (str(folder / name), *expectation.reason):
            assert part in str(raised.value), str(raised.value)
        return
    pixels = _as_uint8(load_image_tensor(folder / name, expectation.size))
    assert pixels.shape == (expectation.size[1], expectation.size[0], 3)
    for (x, y), colour in expectation.pixels:
        difference = np.abs(pixels[y, x].astype(int) - np.array(colour)).max()
        assert difference <= expectation.tolerance, f"{expectation.why}: ({x}, {y}) is {pixels[y, x]}, want {colour}"


@pytest.mark.skipif(not webp_supported(), reason="this Pillow build has no WebP support")
def test_webp_is_used(corpus: Corpus, scanned: ScanResult) -> None:
    assert "image.webp" in {record.path.name for record in scanned.records}


def test_sixteen_bit_rgb_keeps_dark_values(corpus: Corpus) -> None:
    # PIL cannot save 16-bit RGB, so the corpus writes it by hand; a clipping bug would give 255s.
    folder, _ = corpus
    pixels = _as_uint8(load_image_tensor(folder / "rgb16.png", (8, 4)))
    assert pixels[:, :4].max() < 200 and tuple(pixels[0, 0]) == (128, 64, 192)


# --- decompression bomb --------------------------------------------------------------------------


def test_bomb_rejected_from_header_with_small_peak_memory(corpus: Corpus, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = corpus
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes((folder / "bomb.png").read_bytes())
    (tmp_path / "bomb.txt").write_text("a bomb", encoding="utf-8")
    loaded: list[object] = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self) or original_load(self))
    pil_limit = Image.MAX_IMAGE_PIXELS

    tracemalloc.start()
    try:
        result = scan_image_dataset(_cfg(tmp_path))
        with pytest.raises(ImageTooLargeError, match=r"bomb\.png.*1600000000 pixels"):
            load_image_tensor(bomb, (64, 64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < PEAK_MEMORY_LIMIT, f"peak {peak / 2**20:.1f} MiB"
    assert loaded == []  # nothing was decoded, not even partly
    assert result.records == [] and [path for path, _ in result.skipped] == [bomb]
    assert str(MAX_IMAGE_PIXELS) in result.skipped[0][1]
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's global setting is left alone


def test_bomb_guard_does_not_depend_on_pil_global(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    # Some code disables PIL's guard process-wide; ours must still refuse, now with the exact size.
    folder, _ = corpus
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    result = scan_image_dataset(_cfg(folder))
    reasons = {path.name: reason for path, reason in result.skipped}
    assert "40000x40000 = 1600000000 pixels" in reasons["bomb.png"]
    with pytest.raises(ImageTooLargeError):
        load_image_tensor(folder / "bomb.png", (64, 64))


# --- captions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "text", "warns"),
    [
        (b"plain", "plain", False),
        (b"\xef\xbb\xbfbom", "bom", False),
        ("wide ✓".encode("utf-16"), "wide ✓", False),
        ("café".encode("latin-1"), "café", True),
        (b"\x93hi\x94", "“hi”", True),
        (b"x\x81y", "x\x81y", True),  # 0x81 is undefined in cp1252: latin-1 takes it
    ],
)
def test_decode_caption_bytes(data: bytes, text: str, warns: bool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="simpletuner.data.captions"):
        assert decode_caption_bytes(data, Path("dir/c.txt")) == text
    assert [str(Path("dir/c.txt")) in record.getMessage() for record in caplog.records] == ([True] if warns else [])


# --- logging and disk ----------------------------------------------------------------------------


def test_scan_logs_only_caption_fallbacks(corpus: Corpus, caplog: pytest.LogCaptureFixture) -> None:
    # The scan returns skips; the dataset builder logs them, so the scan itself must stay quiet.
    folder, expectations = corpus
    with caplog.at_level(logging.INFO):
        scan_image_dataset(_cfg(folder))
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    warned = sorted(name for name, e in expectations.items() if e.caption_warning)
    assert len(messages) == len(warned)
    for name in warned:
        assert sum(str((folder / name).with_suffix(".txt")) in message for message in messages) == 1


def test_nothing_on_disk_is_modified(corpus: Corpus) -> None:
    folder, expectations = corpus
    before = _snapshot(folder)
    result = scan_image_dataset(_cfg(folder))
    for record in result.records:
        try:
            load_image_tensor(record.path, (record.width, record.height))
        except CorruptImageError:
            assert expectations[record.path.name].outcome == "decode_error"
    for path, _ in result.skipped:
        try:
            load_image_tensor(path, (8, 8))
        except CorruptImageError:
            pass
    assert _snapshot(folder) == before


def test_builder_logs_one_line_per_skipped_file(
    corpus: Corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end: scan skips and decode failures each get exactly one log line naming the file."""
    from simpletuner.data.config import parse_dataset_plan
    from simpletuner.data.dataset import build_training_data
    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.options.resolve import merge_sources
    from simpletuner.testing.tiny_models import make_tiny_model

    folder, expectations = corpus
    before = _snapshot(folder)
    model_folder = tmp_path / "model"
    make_tiny_model("sd1x", model_folder)
    config = merge_sources({}, {
        "model_family": "sd1x", "output_dir": str(tmp_path / "out"), "pretrained_model_name_or_path": str(model_folder),
        "resolution": 32, "resolution_type": "pixel", "cache_dir": str(tmp_path / "cache"), "train_batch_size": 1,
        "seed": 0, "vae_batch_size": 4}, "test", [])
    model = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    model.load()
    plan = parse_dataset_plan([
        {"id": "nasty", "type": "local", "instance_data_dir": str(folder)},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "text")},
    ])

    with caplog.at_level(logging.INFO):
        training = build_training_data(config, model, plan, show_progress=False)

    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    not_used = sorted(name for name, e in expectations.items() if e.outcome != "used")
    for name in expectations:
        mentions = [message for message in messages if str(folder / name) in message]
        assert len(mentions) == (1 if name in not_used else 0), (name, mentions)
    assert sorted(path.name for path, _ in training.summaries[0].skipped) == not_used
    assert _snapshot(folder) == before
