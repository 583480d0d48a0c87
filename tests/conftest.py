"""Shared test setup: never reach a model hub, and a tiny captioned image folder for config tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; every test that trains in-process must leave a clean one
    for the next (whichever folder it is in)."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on this 2-core machine tiny models run faster without
    OpenMP's thread pool, and the tests stay independent of what else runs. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` or from a folder's conftest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: (width, height) of the images written by ``tiny_image_folder``: at resolution 64 (pixel, alignment 8)
#: they fall into the buckets 64x64 (4 images) and 96x64 (2 images).
TINY_IMAGE_SIZES = ((64, 64),) * 4 + ((96, 64),) * 2


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """``tmp_path/images`` with 6 PNGs and a ``<stem>.txt`` caption beside each."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index, size in enumerate(TINY_IMAGE_SIZES):
        Image.new("RGB", size, (40 * index, 100, 200)).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a shape number {index}", encoding="utf-8")
    return folder


def write_minimal_dataset_list(folder: Path) -> Path:
    """A valid multidatabackend.json (an image folder, empty, and a text-embed cache) in ``folder``."""
    import json

    (folder / "images").mkdir(exist_ok=True)
    dataset_list = folder / "multidatabackend.json"
    dataset_list.write_text(json.dumps([
        {"id": "images", "type": "local", "instance_data_dir": str(folder / "images")},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(folder / "cache" / "text")},
    ]), encoding="utf-8")
    return dataset_list
