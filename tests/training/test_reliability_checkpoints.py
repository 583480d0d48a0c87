"""Checkpoints that hold up against attackers and accidents: a crafted pickle is refused without running,
a kill in the middle of pruning leaves nothing that outlives the next start, a full disk gives one
message with the folder and the space and loses no earlier checkpoint, and the fault-injection points
the kill tests rely on fire where they say.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from simpletuner.training import checkpoint as ckpt  # noqa: E402
from simpletuner.training.trainer import train  # noqa: E402
from tests.training.conftest import config_for  # noqa: E402

MIB = 2**20


class WritesAMarker:
    """Unpickling this creates ``path``: proof that loading ran code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def fake_checkpoint(folder: Path, step: int, size: int = 1000, **state) -> Path:
    writers = {"weights.bin": lambda p: p.write_bytes(b"x" * size),
               "optimizer.pt": lambda p: torch.save({"state": {}, "param_groups": []}, p)}
    return ckpt.write_checkpoint(folder, step, writers, {"global_step": step, **state})


def plant_in_checkpoint(folder: Path, name: str, payload) -> None:
    """Replace one file of a complete checkpoint and fix its manifest, as an attacker would."""
    torch.save(payload, folder / name)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][name] = (folder / name).stat().st_size
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.is_complete(folder)


# --- no code runs on resume ----------------------------------------------------------------------------


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = fake_checkpoint(tmp_path / "out", 1)
    plant_in_checkpoint(folder, "optimizer.pt", {"state": WritesAMarker(marker)})
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load_state(folder / "optimizer.pt")
    message = str(caught.value)
    assert str(folder / "optimizer.pt") in message
    assert "refused to load" in message and "a reference to io.open" in message and "could run code" in message
    assert not marker.exists()


def test_resume_refuses_a_planted_optimizer_state_without_running_it(project, tmp_path):
    marker = tmp_path / "pwned"
    train(config_for(project, "planted", max_train_steps=2, checkpoint_step_interval=2), show_progress=False)
    folder = project / "planted" / "checkpoint-2"
    plant_in_checkpoint(folder, "optimizer.pt", {"state": {}, "param_groups": [WritesAMarker(marker)]})
    with pytest.raises(ckpt.CheckpointError, match="refused to load .*checkpoint-2/optimizer.pt"):
        train(config_for(project, "planted", max_train_steps=4, resume_from_checkpoint="latest"), show_progress=False)
    assert not marker.exists()


def test_a_damaged_state_file_is_a_checkpoint_error_naming_it(tmp_path):
    (tmp_path / "random_states.pt").write_bytes(b"not a zip archive at all")
    with pytest.raises(ckpt.CheckpointError, match="could not load .*random_states.pt: it is not a state file"):
        ckpt.load_state(tmp_path / "random_states.pt")


def test_random_states_round_trip_through_the_safe_loader(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    import numpy as np

    np.random.seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "random_states.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng_state(ckpt.load_state(tmp_path / "random_states.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def _optimizer_names() -> list[str]:
    from simpletuner.training.optim import OPTIMIZERS

    return sorted(OPTIMIZERS)


@pytest.mark.parametrize("name", _optimizer_names())
def test_every_optimizer_state_loads_with_the_safe_loader(name, tmp_path):
    from tests.training.test_optimizers import settings, step_quadratic

    from simpletuner.training.optim import build_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(8))]
    optimizer = build_optimizer(settings(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-2), params)
    step_quadratic(optimizer, params, 2)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    loaded = ckpt.load_state(tmp_path / "optimizer.pt")
    assert loaded["param_groups"] == optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict(loaded)  # the real resume call accepts what the safe loader returns


def test_every_lr_schedule_and_the_ema_state_load_with_the_safe_loader(tmp_path):
    from simpletuner.training.ema import EmaWeights
    from simpletuner.training.lr import SCHEDULES, build_lr_scheduler

    params = [torch.nn.Parameter(torch.randn(3))]
    for schedule in SCHEDULES:
        optimizer = torch.optim.SGD(params, lr=0.1)
        config = SimpleNamespace(lr_scheduler=schedule, lr_warmup_steps=2, lr_end=1e-7, lr_power=1.0, lr_num_cycles=2)
        scheduler = build_lr_scheduler(config, optimizer, 10)
        optimizer.step()
        scheduler.step()
        torch.save(scheduler.state_dict(), tmp_path / "lr_scheduler.pt")
        assert ckpt.load_state(tmp_path / "lr_scheduler.pt")["last_epoch"] == 1, schedule
    ema = EmaWeights(params, decay=0.9)
    ema.update()
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    assert torch.equal(ckpt.load_state(tmp_path / "ema.pt")["shadow_params"][0], ema.state_dict()["shadow_params"][0])


# --- pruning survives a kill ---------------------------------------------------------------------------


def test_pruning_renames_to_trash_first_so_an_interrupted_delete_hides_nothing(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    monkeypatch.setenv(ckpt.FAULT_INJECT_ENV, "during_prune:enospc@1")  # stop between the rename and the delete
    with pytest.raises(OSError):
        ckpt.prune_checkpoints(tmp_path, 2)
    monkeypatch.delenv(ckpt.FAULT_INJECT_ENV)
    assert not (tmp_path / "checkpoint-1").exists()
    trash = [entry.name for entry in tmp_path.iterdir() if entry.name.startswith(ckpt.TRASH_PREFIX)]
    assert trash == [f"{ckpt.TRASH_PREFIX}checkpoint-1-{os.getpid()}"]
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    ckpt.remove_stale_temp_folders(tmp_path)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_start_up_removes_half_deleted_and_renamed_trash_and_retention_counts_stay_right(tmp_path, caplog):
    for step in (5, 6, 7):
        fake_checkpoint(tmp_path, step)
    renamed = fake_checkpoint(tmp_path, 3).rename(tmp_path / f"{ckpt.TRASH_PREFIX}checkpoint-3-4242")
    half = fake_checkpoint(tmp_path, 4).rename(tmp_path / f"{ckpt.TRASH_PREFIX}checkpoint-4-4242")
    (half / "weights.bin").unlink()  # the delete got as far as the weights: manifest and optimizer.pt remain
    temp = tmp_path / f"{ckpt.TEMP_PREFIX}8-4242"
    temp.mkdir()
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [5, 6, 7]  # trash is never a checkpoint
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        ckpt.remove_stale_temp_folders(tmp_path)
    assert not renamed.exists() and not half.exists() and not temp.exists()
    assert "an old checkpoint whose deletion was interrupted" in caplog.text
    assert ckpt.prune_checkpoints(tmp_path, 2) == [tmp_path / "checkpoint-5"]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-7"]


def test_a_damaged_checkpoint_is_reported_at_start_up_but_kept(tmp_path, caplog):
    damaged = fake_checkpoint(tmp_path, 2)
    (damaged / "weights.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        ckpt.remove_stale_temp_folders(tmp_path)
    assert damaged.is_dir() and "checkpoint-2 has a manifest but files are missing" in caplog.text


def test_rewriting_an_existing_step_never_leaves_a_half_deleted_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 4, size=10)
    fake_checkpoint(tmp_path, 4, size=20)  # a resumed run reaching the same step again
    assert (tmp_path / "checkpoint-4" / "weights.bin").stat().st_size == 20
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoint-4"]


# --- a full disk -----------------------------------------------------------------------------------------


def _disk_with(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=100 * MIB, used=0, free=free))


def _safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


WRITE_FAILURES = {
    "oserror": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "torch": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                                  "file data/0: file write failed"),
    "safetensors": _safetensor_error,
}


@pytest.mark.parametrize("kind", sorted(WRITE_FAILURES))
def test_a_full_disk_names_the_folder_and_the_space_and_keeps_earlier_checkpoints(kind, tmp_path, monkeypatch):
    good = fake_checkpoint(tmp_path, 1, size=3 * MIB)
    needed = ckpt.checkpoint_size(good)

    def fills_the_disk(path: Path) -> None:
        path.write_bytes(b"y" * 4096)
        raise WRITE_FAILURES[kind]()

    _disk_with(monkeypatch, free=100 * 1024)
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.write_checkpoint(tmp_path, 2, {"weights.bin": lambda p: p.write_bytes(b"x"),
                                            "optimizer.pt": fills_the_disk}, {"global_step": 2})
    message = str(caught.value)
    assert f"could not write checkpoint {tmp_path / 'checkpoint-2'}: the disk is full" in message
    assert f"needs about {ckpt.format_size(needed)} (the size of checkpoint-1)" in message
    assert f"100.00 KiB was free on the filesystem of {tmp_path}" in message
    assert "--resume_from_checkpoint latest" in message
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoint-1"]  # no temp folder left
    assert ckpt.list_checkpoints(tmp_path) == [ckpt.CheckpointInfo(good, 1)]
    assert ckpt.load_state(good / "optimizer.pt") == {"state": {}, "param_groups": []}
    _disk_with(monkeypatch, free=50 * MIB)  # space freed: the same checkpoint now writes
    assert fake_checkpoint(tmp_path, 2).name == "checkpoint-2"


def test_a_failure_that_is_not_a_full_disk_says_the_write_failed_and_what_was_written(tmp_path, monkeypatch):
    def fails(path: Path) -> None:
        path.write_bytes(b"z" * 2048)
        raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")

    _disk_with(monkeypatch, free=50 * MIB)
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.write_checkpoint(tmp_path, 1, {"optimizer.pt": fails}, {"global_step": 1})
    message = str(caught.value)
    assert "the write failed (RuntimeError): PytorchStreamWriter failed writing file data/3" in message
    assert "needs more than the 2.00 KiB written before the failure" in message
    assert list(tmp_path.iterdir()) == []


def test_a_full_staging_disk_removes_both_folders(tmp_path, monkeypatch):
    staging_root = tmp_path / "staging"
    staging_root.mkdir()
    _disk_with(monkeypatch, free=0)

    def fails(path: Path) -> None:
        path.write_bytes(b"y" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match="staged under .*the disk is full.*filesystem of .*staging"):
        ckpt.write_checkpoint(tmp_path / "out", 1, {"optimizer.pt": fails}, {"global_step": 1},
                              staging_root=staging_root)
    assert list(staging_root.iterdir()) == [] and list((tmp_path / "out").iterdir()) == []


def test_a_run_hitting_a_full_disk_stops_cleanly_and_resumes_once_space_is_back(project, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_INJECT_ENV, "after_file=pytorch_lora_weights.safetensors:enospc@4")
    config = config_for(project, "full-disk", max_train_steps=6, checkpoint_step_interval=2)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-4: the disk is full.*size of checkpoint-2"):
        train(config, show_progress=False)
    out = project / "full-disk"
    assert [info.step for info in ckpt.list_checkpoints(out)] == [2]
    assert not [entry for entry in out.iterdir() if entry.name.startswith(".")]
    monkeypatch.delenv(ckpt.FAULT_INJECT_ENV)
    resumed = train(config_for(project, "full-disk", max_train_steps=6, checkpoint_step_interval=2,
                               resume_from_checkpoint="latest"), show_progress=False)
    assert resumed.resumed_from == out / "checkpoint-2" and resumed.state.global_step == 6
    assert [info.step for info in ckpt.list_checkpoints(out)] == [2, 4, 6]


# --- fault injection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["after_file=weights.bin", "after_file=training_state.json", "before_manifest",
                                   "before_rename"])
def test_each_injection_point_fires_inside_the_writer(point, tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_INJECT_ENV, f"{point}:enospc@2")
    fake_checkpoint(tmp_path, 1)  # another step: untouched
    with pytest.raises(ckpt.CheckpointError, match=f"injected by SIMPLETUNER_FAULT_INJECT at {point}"):
        fake_checkpoint(tmp_path, 2)
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [1]


def test_a_malformed_injection_spec_says_how_to_write_it(monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_INJECT_ENV, "before_rename:explode")
    with pytest.raises(ValueError, match=r"<point>:<action>\[@<step>\] with action kill or enospc"):
        ckpt.inject_fault("before_rename", 1)
    monkeypatch.delenv(ckpt.FAULT_INJECT_ENV)
    ckpt.inject_fault("before_rename", 1)  # unset: nothing happens
