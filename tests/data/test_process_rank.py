"""The data layer takes its process count and rank from the caller, never from the environment.

Under ``accelerate launch`` every process builds the data; only rank 0 may write the files they share
(the stored scan and the content index), and every dataset must fill a batch on each process. The
trainer passes what its accelerator knows; RANK / WORLD_SIZE in the environment change nothing here.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

from simpletuner.data.build import build_training_data
from simpletuner.data.cache.vae import CONTENT_INDEX_NAME
from simpletuner.data.scan_cache import SCAN_CACHE_NAME
from simpletuner.data.settings import DataSettings
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images

SHARED_FILES = {SCAN_CACHE_NAME, CONTENT_INDEX_NAME}


@pytest.fixture
def launched_environment(monkeypatch):
    """What accelerate sets for the second of four processes."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")


def shared_files_under(folder: Path) -> set[str]:
    return {path.name for path in folder.rglob("*") if path.name in SHARED_FILES}


def test_settings_use_the_rank_they_are_given_not_the_environment(tmp_path, launched_environment):
    config = make_config(tmp_path)
    alone = DataSettings.from_config(config)
    assert (alone.num_processes, alone.rank, alone.is_main_process) == (1, 0, True)
    second = DataSettings.from_config(config, num_processes=4, rank=1)
    assert (second.num_processes, second.rank, second.is_main_process) == (4, 1, False)


def test_only_the_main_process_writes_the_shared_scan_and_content_index(tmp_path, launched_environment):
    write_images(tmp_path / "images", 4)
    plan = make_plan(tmp_path, local("d", tmp_path / "images"))
    other = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False,
                                num_processes=2, rank=1)
    assert other.batch_size == 2
    assert shared_files_under(tmp_path / "cache") == set()  # left to rank 0; its latents are still cached
    assert len(list((tmp_path / "cache" / "vae" / "d").rglob("*.safetensors"))) == 4
    build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)  # RANK=1 is ignored
    assert shared_files_under(tmp_path / "cache") == SHARED_FILES


def test_each_process_must_get_a_batch(tmp_path):
    from simpletuner.data.dataset import NoTrainingDataError

    write_images(tmp_path / "images", 4)
    plan = make_plan(tmp_path, local("d", tmp_path / "images"))
    build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False, num_processes=2)
    with pytest.raises(NoTrainingDataError):
        build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False, num_processes=4)
