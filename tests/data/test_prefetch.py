"""``--dataloader_prefetch``: the same batches, in the same order, with the same resume points."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

from simpletuner.data.build import build_training_data
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images


@pytest.fixture
def plan(tmp_path: Path):
    """Two datasets: ``early`` stops at step 3, ``late`` starts at step 2, so the active set
    changes twice while batches are being read ahead."""
    write_images(tmp_path / "early", 4)
    write_images(tmp_path / "late", 6, prefix="late")
    (tmp_path / "late" / "late_00.txt").write_text("one\ntwo\nthree", encoding="utf-8")
    return make_plan(tmp_path, local("early", tmp_path / "early", end_step=3),
                     local("late", tmp_path / "late", start_step=2, repeats=1))


def _build(tmp_path: Path, plan, **options):
    return build_training_data(make_config(tmp_path, **options), FakeModel(), plan, show_progress=False)


def _run(data, steps: int, per_step: int = 2) -> list[tuple]:
    out = []
    for step in range(steps):
        for _ in range(per_step):
            batch = data.next_batch(step)
            out.append((batch["dataset_id"], tuple(batch["paths"]), tuple(batch["captions"]),
                        batch["latent_mean"].sum().item()))
    return out


def test_prefetch_yields_exactly_the_synchronous_order(tmp_path: Path, plan) -> None:
    expected = _run(_build(tmp_path, plan), 12)
    prefetched = _build(tmp_path, plan, dataloader_prefetch=True, dataloader_prefetch_qlen=4)
    assert prefetched._prefetcher is not None
    assert _run(prefetched, 12) == expected
    assert {name for name, *_ in expected} == {"early", "late"}
    prefetched.close()


def test_prefetch_state_is_the_consumed_position_and_resumes_exactly(tmp_path: Path, plan) -> None:
    reference = _build(tmp_path, plan)
    _run(reference, 3)
    reference_state = reference.state_dict()
    expected = _run(reference, 4)

    data = _build(tmp_path, plan, dataloader_prefetch=True, dataloader_prefetch_qlen=5)
    _run(data, 3)
    state = data.state_dict()
    assert state == reference_state  # not the read-ahead position
    assert _run(data, 4) == expected
    resumed = _build(tmp_path, plan, dataloader_prefetch=True, dataloader_prefetch_qlen=5)
    _run(resumed, 1)  # reading ahead already: load_state_dict must discard it
    resumed.load_state_dict(state)
    assert _run(resumed, 4) == expected
    resumed.close()
    data.close()


def test_prefetch_with_skipped_batches_of_other_processes(tmp_path: Path, plan) -> None:
    def local_batches(data) -> list[tuple]:
        out = []
        for step in range(8):
            batch = data.next_local_batch(step, rank=1, num_processes=2)
            out.append((tuple(batch["paths"]), batch["latent_mean"].sum().item()))
        return out

    expected = local_batches(_build(tmp_path, plan))
    data = _build(tmp_path, plan, dataloader_prefetch=True, dataloader_prefetch_qlen=3)
    data.enable_prefetch(3, rank=1, num_processes=2)  # what RANK/WORLD_SIZE give under accelerate
    assert local_batches(data) == expected
    data.close()


def test_errors_in_the_prefetch_thread_reach_the_caller(tmp_path: Path, plan, monkeypatch) -> None:
    data = _build(tmp_path, plan, dataloader_prefetch=True)
    calls = {"n": 0}
    real = data.text_cache.load

    def failing(caption):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk gone")
        return real(caption)

    monkeypatch.setattr(data.text_cache, "load", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        for step in range(10):
            data.next_batch(step)
    data.close()
    assert torch.is_tensor(_build(tmp_path, plan).next_batch()["latent_mean"])
