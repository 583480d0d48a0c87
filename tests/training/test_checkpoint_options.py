"""The checkpoint options beyond the step interval: epoch and rolling checkpoints with their own limits,
staging in the system temp dir, the free-space check before a save, and the post-checkpoint script.

The pieces are checked directly first (no model), then in short real runs on the tiny sd1x model.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from simpletuner.training import checkpoint as ckpt  # noqa: E402
from simpletuner.training.checkpoint_hooks import DiskGuard, PostCheckpointScripts  # noqa: E402
from simpletuner.training.checkpoint_schedule import REGULAR, ROLLING, CheckpointSchedule  # noqa: E402
from tests.training.conftest import Interrupted, config_for, crash_after_step  # noqa: E402

GIB = 2**30


def fake_checkpoint(folder: Path, step: int, rolling: bool = False, staging_root: Path | None = None) -> Path:
    return ckpt.write_checkpoint(folder, step, {"weights.bin": lambda p: p.write_bytes(b"x" * step)},
                                 {"global_step": step, "rolling": rolling}, staging_root=staging_root)


def free_space(monkeypatch, *free_bytes: int) -> list[int]:
    """``shutil.disk_usage`` reports these free sizes in turn (the last one from then on); returns the
    list of values actually handed out."""
    handed: list[int] = []

    def disk_usage(path):
        value = free_bytes[min(len(handed), len(free_bytes) - 1)]
        handed.append(value)
        return SimpleNamespace(total=100 * GIB, used=100 * GIB - value, free=value)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return handed


# --- which steps get a checkpoint --------------------------------------------------------------------


def test_schedule_combines_step_epoch_and_rolling_intervals():
    schedule = CheckpointSchedule(step_interval=5, epoch_interval=2, steps_per_epoch=3, rolling_interval=2)
    kinds = {step: schedule.kind_at(step) for step in range(1, 13)}
    assert [s for s, k in kinds.items() if k == REGULAR] == [5, 6, 10, 12]  # every 5 steps, every 2nd epoch of 3
    assert [s for s, k in kinds.items() if k == ROLLING] == [2, 4, 8]  # 6, 10 and 12 are saved once, as regular
    assert CheckpointSchedule().kind_at(4) is None
    assert CheckpointSchedule(epoch_interval=1, steps_per_epoch=4).kind_at(4) == REGULAR


# --- kinds, pruning and latest -----------------------------------------------------------------------


def test_each_limit_only_prunes_its_own_kind_and_latest_considers_both(tmp_path):
    for step in (1, 2, 3, 4, 5, 6):
        fake_checkpoint(tmp_path, step, rolling=step % 2 == 1)
    fake_checkpoint(tmp_path, 7, rolling=True)
    assert ckpt.resolve_resume_path(tmp_path, "latest") == tmp_path / "checkpoint-7"  # a rolling one

    ckpt.prune_checkpoints(tmp_path, 1)  # regular: 2, 4, 6 -> 6
    assert [(c.step, c.rolling) for c in ckpt.list_checkpoints(tmp_path)] == [
        (1, True), (3, True), (5, True), (6, False), (7, True)]
    ckpt.prune_checkpoints(tmp_path, 2, rolling=True)  # rolling: 1, 3, 5, 7 -> 5, 7
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [5, 6, 7]


def test_checkpoints_written_before_rolling_ones_existed_count_as_regular(tmp_path):
    old = ckpt.write_checkpoint(tmp_path, 3, {"a.bin": lambda p: p.write_bytes(b"a")}, {"global_step": 3})
    assert ckpt.list_checkpoints(tmp_path) == [ckpt.CheckpointInfo(old, 3, rolling=False)]
    assert ckpt.prune_checkpoints(tmp_path, 1, rolling=True) == []


# --- --checkpointing_use_tempdir ----------------------------------------------------------------------


def test_tempdir_writes_in_the_staging_folder_and_moves_the_checkpoint_into_place(tmp_path):
    staging_root, out = tmp_path / "local-tmp", tmp_path / "out"
    staging_root.mkdir()
    written_in = []

    def weights(path: Path) -> None:
        written_in.append(path.parent)
        (path.parent / "sub").mkdir()
        (path.parent / "sub" / "part.bin").write_bytes(b"p" * 10)
        path.write_bytes(b"w" * 100)

    folder = ckpt.write_checkpoint(out, 4, {"weights.bin": weights}, {"global_step": 4}, staging_root=staging_root)
    assert written_in[0].parent == staging_root and written_in[0].name.startswith(ckpt.STAGING_PREFIX)
    assert folder == out / "checkpoint-4" and ckpt.is_complete(folder)
    assert (folder / "sub" / "part.bin").read_bytes() == b"p" * 10
    assert list(staging_root.iterdir()) == [] and not list(out.glob(".tmp-checkpoint-*"))


def test_tempdir_move_interrupted_leaves_no_checkpoint(tmp_path, monkeypatch):
    staging_root, out = tmp_path / "local-tmp", tmp_path / "out"
    staging_root.mkdir()
    good = fake_checkpoint(out, 1, staging_root=staging_root)
    moved = []
    real_move = shutil.move

    def move_then_fail(source, target):
        if moved:  # the second file: the network mount went away mid-move
            raise OSError(5, "Input/output error")
        moved.append(target)
        return real_move(source, target)

    monkeypatch.setattr(shutil, "move", move_then_fail)
    with pytest.raises(ckpt.CheckpointError, match="Input/output error.*untouched"):
        ckpt.write_checkpoint(out, 2, {"a.bin": lambda p: p.write_bytes(b"a"), "b.bin": lambda p: p.write_bytes(b"b")},
                              {"global_step": 2}, staging_root=staging_root)
    assert ckpt.list_checkpoints(out) == [ckpt.CheckpointInfo(good, 1)]
    assert not (out / "checkpoint-2").exists() and not list(out.glob(".tmp-checkpoint-*"))
    assert list(staging_root.iterdir()) == []


# --- --disk_low_* ------------------------------------------------------------------------------------


def guard(tmp_path: Path, action: str = "stop", script: str | None = None, sleeps: list | None = None) -> DiskGuard:
    return DiskGuard(folder=tmp_path, threshold=GIB, threshold_text="1G", action=action, script=script,
                     sleep=(sleeps.append if sleeps is not None else None))


def test_disk_low_stop_names_free_space_threshold_and_fix(tmp_path, monkeypatch):
    free_space(monkeypatch, 10 * 2**20)
    with pytest.raises(ckpt.CheckpointError) as error:
        guard(tmp_path).ensure_space(7)
    message = str(error.value)
    assert "only 10.00 MiB free" in message and "--disk_low_threshold 1G (1.00 GiB)" in message
    assert "step 7" in message and "--resume_from_checkpoint latest" in message
    free_space(monkeypatch, 2 * GIB)
    guard(tmp_path).ensure_space(7)  # enough space: nothing happens


def test_disk_low_wait_rechecks_until_space_appears(tmp_path, monkeypatch, caplog):
    handed = free_space(monkeypatch, 1, 2, 3, 2 * GIB)
    sleeps: list[float] = []
    with caplog.at_level(logging.INFO, logger="simpletuner.training.checkpoint_hooks"):
        guard(tmp_path, "wait", sleeps=sleeps).ensure_space(5)
    assert sleeps == [30.0, 30.0, 30.0] and len(handed) == 4
    assert "waiting for space, checking every 30s" in caplog.text
    assert "after waiting 90s; saving the checkpoint for step 5" in caplog.text


def cleanup_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "cleanup.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {shlex.quote(str(tmp_path / 'ran.txt'))}\n{body}\n")
    script.chmod(0o755)
    return script


def test_disk_low_script_frees_space_and_the_save_goes_on(tmp_path, monkeypatch):
    free_space(monkeypatch, 1, 2 * GIB)
    guard(tmp_path, "script", str(cleanup_script(tmp_path, "exit 0"))).ensure_space(3)
    assert (tmp_path / "ran.txt").read_text() == "ran\n"


def test_disk_low_script_failing_or_freeing_too_little_stops(tmp_path, monkeypatch):
    free_space(monkeypatch, 1, 2 * GIB)
    with pytest.raises(ckpt.CheckpointError, match="failed with exit status 4"):
        guard(tmp_path, "script", str(cleanup_script(tmp_path, "exit 4"))).ensure_space(3)
    free_space(monkeypatch, 1, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"ran, but only 2 B free"):
        guard(tmp_path, "script", str(cleanup_script(tmp_path, "exit 0"))).ensure_space(3)


# --- --post_checkpoint_script ------------------------------------------------------------------------


def scripts(template: str, **values) -> PostCheckpointScripts:
    return PostCheckpointScripts(template=template, config_values={"model_family": "sd1x", **values})


def test_post_checkpoint_command_fills_each_argument_without_a_shell(tmp_path):
    folder = tmp_path / "my run" / "checkpoint-3"
    command = scripts("hook --path {local_checkpoint_path} --at={global_step} '{model_family} x'").command_for(folder, 3)
    assert command == ["hook", "--path", str(folder.resolve()), "--at=3", "sd1x x"]
    assert scripts("hook step-{global_step:05d}").command_for(folder, 3) == ["hook", "step-00003"]
    shell = scripts("hook {local_checkpoint_path} {global_step} > log.txt").command_for(folder, 3)
    assert shell == f"hook {shlex.quote(str(folder.resolve()))} 3 > log.txt"  # shell syntax: values are quoted


def test_failing_post_checkpoint_script_only_warns(tmp_path, caplog):
    folder = fake_checkpoint(tmp_path, 2)
    hooks = scripts(f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(3)' {{global_step}}")
    with caplog.at_level(logging.INFO, logger="simpletuner.training.checkpoint_hooks"):
        hooks.launch(folder, 2)
        hooks.wait()
        scripts(str(tmp_path / "does-not-exist")).launch(folder, 2)
    assert "--post_checkpoint_script for checkpoint-2 failed with exit status 3 (training goes on)" in caplog.text
    assert "--post_checkpoint_script could not start for checkpoint-2" in caplog.text
    assert hooks.running == []


# --- short real runs ---------------------------------------------------------------------------------


def steps_on_disk(folder: Path) -> dict[int, bool]:
    """step -> rolling, for the complete checkpoints in ``folder``."""
    return {info.step: info.rolling for info in ckpt.list_checkpoints(folder)}


def record_saves(monkeypatch) -> list[tuple[int, bool]]:
    from simpletuner.training.trainer import Trainer

    saves: list[tuple[int, bool]] = []
    original = Trainer.save_checkpoint

    def save(self, rolling=False):
        saves.append((self.state.global_step, rolling))
        return original(self, rolling=rolling)

    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    return saves


@pytest.mark.slow
def test_epoch_rolling_and_total_limits_together(project, monkeypatch):
    from simpletuner.training.trainer import train

    saves = record_saves(monkeypatch)
    trainer = train(config_for(project, "combined", max_train_steps=6, checkpoint_step_interval=5,
                               checkpoint_epoch_interval=1, checkpoints_total_limit=1, checkpointing_rolling_steps=1,
                               checkpoints_rolling_total_limit=2), show_progress=False)
    assert trainer.steps_per_epoch == 4
    # 4 ends epoch 1, 5 is the step interval (both regular); every other step is a rolling one
    assert saves == [(1, True), (2, True), (3, True), (4, False), (5, False), (6, True)]
    # regular: 4 and 5, limit 1 -> 5; rolling: 1, 2, 3, 6, limit 2 -> 3 and 6
    assert steps_on_disk(project / "combined") == {3: True, 5: False, 6: True}
    state = json.loads((project / "combined" / "checkpoint-6" / "training_state.json").read_text())
    assert state["rolling"] is True and state["global_step"] == 6


@pytest.mark.slow
def test_rolling_pruning_survives_a_restart_and_latest_picks_the_newest_kind(project, monkeypatch):
    from simpletuner.training.trainer import train

    overrides = dict(max_train_steps=6, checkpoint_step_interval=3, checkpointing_rolling_steps=1,
                     checkpoints_rolling_total_limit=2, resume_from_checkpoint="latest")
    with crash_after_step(4), pytest.raises(Interrupted):
        train(config_for(project, "restart", **overrides), show_progress=False)
    assert steps_on_disk(project / "restart") == {2: True, 3: False, 4: True}

    resumed = train(config_for(project, "restart", **overrides), show_progress=False)
    assert resumed.resumed_from == project / "restart" / "checkpoint-4"  # rolling, newer than regular 3
    assert resumed.state.global_step == 6
    # the new process still knows 2 and 4 are rolling: step 5 prunes 2, while regular 3 and 6 stay
    assert steps_on_disk(project / "restart") == {3: False, 4: True, 5: True, 6: False}


@pytest.mark.slow
def test_tempdir_run_stages_in_the_system_temp_dir_and_resumes(project, monkeypatch, tmp_path):
    from simpletuner.training.trainer import train

    local_tmp = tmp_path / "local-disk-tmp"
    local_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))
    written_in: set[Path] = set()
    original_write = ckpt.write_checkpoint

    def spying_write(output_dir, step, writers, training_state, staging_root=None):
        def spy(write):
            def wrapped(path):
                written_in.add(path.parent)
                return write(path)
            return wrapped

        return original_write(output_dir, step, {name: spy(w) for name, w in writers.items()}, training_state,
                              staging_root=staging_root)

    monkeypatch.setattr(ckpt, "write_checkpoint", spying_write)
    train(config_for(project, "tempdir", max_train_steps=2, checkpoint_step_interval=2,
                     checkpointing_use_tempdir="true"), show_progress=False)
    assert written_in and all(folder.parent == local_tmp for folder in written_in)
    assert list(local_tmp.iterdir()) == []  # the staging folder was moved away and removed
    folder = project / "tempdir" / "checkpoint-2"
    assert ckpt.is_complete(folder) and (folder / "pytorch_lora_weights.safetensors").is_file()

    resumed = train(config_for(project, "tempdir", max_train_steps=3, resume_from_checkpoint="latest",
                               checkpointing_use_tempdir="true"), show_progress=False)
    assert resumed.resumed_from == folder and resumed.state.global_step == 3


@pytest.mark.slow
def test_disk_low_stop_ends_the_run_before_writing_anything(project, monkeypatch):
    from simpletuner.training.trainer import train

    free_space(monkeypatch, 5 * GIB, 200 * 2**20)  # room for step 1, then 200 MiB
    with pytest.raises(ckpt.CheckpointError, match=r"only 200.00 MiB free .* under --disk_low_threshold 1G") as error:
        train(config_for(project, "disk-low", checkpoint_step_interval=1, disk_low_threshold="1G"),
              show_progress=False)
    assert "before the checkpoint for step 2" in str(error.value)
    out = project / "disk-low"
    assert steps_on_disk(out) == {1: False} and ckpt.is_complete(out / "checkpoint-1")
    assert not (out / "checkpoint-2").exists() and not list(out.glob(".tmp-checkpoint-*"))


@pytest.mark.slow
def test_post_checkpoint_script_gets_its_placeholders_and_the_run_waits_for_it(project, tmp_path, caplog):
    from simpletuner.training.trainer import train

    record = tmp_path / "hook.py"
    record.write_text(
        "import json, sys, time\n"
        "out, step = sys.argv[1], sys.argv[3]\n"
        f"open({str(tmp_path)!r} + f'/args-{{step}}.json', 'w').write(json.dumps(sys.argv[2:]))\n"
        "if step == '2':\n"
        "    time.sleep(3)  # still running when training ends\n"
        "sys.exit(3 if step == '1' else 0)\n")
    template = (f"{shlex.quote(sys.executable)} {shlex.quote(str(record))} out {{local_checkpoint_path}} {{global_step}} "
                "{model_family} {model_type} {lora_type} {tracker_run_name} {tracker_project_name} "
                "h={huggingface_path} r={remote_checkpoint_path} {validation_guidance}")
    with caplog.at_level(logging.INFO, logger="simpletuner.training.checkpoint_hooks"):
        trainer = train(config_for(project, "hooked", max_train_steps=2, checkpoint_step_interval=1,
                                   post_checkpoint_script=template, validation_guidance=5.5,
                                   tracker_run_name="my-run"), show_progress=False)
    assert trainer.state.global_step == 2  # the failing first run did not stop training
    for step in (1, 2):
        args = json.loads((tmp_path / f"args-{step}.json").read_text())
        assert args == [str((project / "hooked" / f"checkpoint-{step}").resolve()), str(step), "sd1x", "lora",
                        "standard", "my-run", "simpletuner", "h=", "r=", "5.5"]
    assert "--post_checkpoint_script for checkpoint-1 failed with exit status 3 (training goes on)" in caplog.text
    assert "waiting for 1 --post_checkpoint_script run(s) to finish" in caplog.text
    assert "--post_checkpoint_script for checkpoint-2 finished (exit status 0)" in caplog.text
