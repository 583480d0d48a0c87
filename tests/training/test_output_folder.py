"""Re-running in an output_dir that already holds a run: resume the same run, refuse another one,
``--overwrite_output_dir`` moves the earlier run aside, and TensorBoard curves continue as one run.

The decision is checked on hand-made checkpoint folders (fast); two short CLI runs check the whole
path, from the command line to the checkpoints written.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.testing.config import make_config
from simpletuner.training import checkpoint as ckpt
from simpletuner.training.output_folder import (
    RUN_CONFIG_KEY,
    apply_folder_plan,
    defines_the_run,
    identity_differences,
    plan_output_folder,
    run_identity,
)
from tests.training.conftest import run_args

NOW = datetime(2025, 1, 2, 3, 4, 5)


def config_in(output: Path, **overrides):
    values = {"model_family": "sd1x", "output_dir": str(output), "learning_rate": 1e-3, "lora_rank": 4, **overrides}
    return make_config(**values)


def fake_checkpoint(output: Path, step: int, config=None, **state) -> Path:
    """A complete checkpoint folder (manifest and all) holding only training_state.json."""
    training_state = {"global_step": step, "micro_step": step, "num_images_seen": step, "max_steps": 10, **state}
    if config is not None:
        training_state[RUN_CONFIG_KEY] = run_identity(config)
    return ckpt.write_checkpoint(output, step, {}, training_state)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# --- what defines a run ------------------------------------------------------------------------------


def test_run_length_output_and_logging_options_do_not_define_the_run() -> None:
    for name in ("max_train_steps", "num_train_epochs", "output_dir", "resume_from_checkpoint",
                 "overwrite_output_dir", "validation_step_interval", "checkpoint_step_interval", "report_to",
                 "gradient_checkpointing", "num_processes", "cache_dir"):
        assert not defines_the_run(name), name
    for name in ("learning_rate", "lora_rank", "model_family", "pretrained_model_name_or_path", "data_backend_config",
                 "resolution", "optimizer", "seed", "train_batch_size", "mixed_precision"):
        assert defines_the_run(name), name


def test_differences_name_old_and_new_values_in_table_order(tmp_path: Path) -> None:
    old = run_identity(config_in(tmp_path))
    new = run_identity(config_in(tmp_path, lora_rank=8, learning_rate=5e-4, max_train_steps=99))
    assert identity_differences(old, new) == [("lora_rank", 4, 8), ("learning_rate", 0.001, 0.0005)]
    old_record = {name: value for name, value in old.items() if name != "lora_alpha"}  # an option added later
    assert identity_differences(old_record, old) == []


# --- the decision ------------------------------------------------------------------------------------


def test_empty_folder_starts_fresh(tmp_path: Path) -> None:
    plan = plan_output_folder(config_in(tmp_path / "out"))
    assert (plan.action, plan.resume_from_checkpoint) == ("fresh", None)
    assert not (tmp_path / "out").exists()  # deciding writes nothing


def test_same_run_resumes_from_the_newest_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_checkpoint(out, 10, config_in(out))
    newest = fake_checkpoint(out, 20, config_in(out))
    plan = plan_output_folder(config_in(out, max_train_steps=40, validation_step_interval=5))
    assert (plan.action, plan.resume_from_checkpoint) == ("resume", str(newest))
    assert "resuming from checkpoint-20" in plan.note
    config = apply_folder_plan(plan, config_in(out))
    assert config.resume_from_checkpoint == str(newest)


def test_another_run_is_refused_with_the_differences_and_the_ways_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_checkpoint(out, 10, config_in(out))
    fake_checkpoint(out, 20, config_in(out))
    before = snapshot(out)
    with pytest.raises(ConfigError) as error:
        plan_output_folder(config_in(out, lora_rank=8, learning_rate=5e-4))
    message = str(error.value)
    assert message.startswith(f"`--output_dir` {out} holds checkpoints of another run (newest: checkpoint-20); its "
                              "config differs: lora_rank 4 -> 8, learning_rate 0.001 -> 0.0005.")
    for way_out in ("a new `--output_dir`", "`--resume_from_checkpoint latest` on the command line",
                    "`--overwrite_output_dir`"):
        assert way_out in message
    assert "\n" not in message
    assert snapshot(out) == before


def test_many_differences_are_summarised(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_checkpoint(out, 5, config_in(out))
    with pytest.raises(ConfigError, match=r"differs: lora_rank 4 -> 8, seed unset -> 3, train_batch_size 1 -> 2 "
                                          r"\(and 2 more\)\."):
        plan_output_folder(config_in(out, lora_rank=8, learning_rate=5e-4, seed=3, train_batch_size=2, use_ema=True))


def test_checkpoints_of_older_versions_are_compared_with_training_config_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_checkpoint(out, 10)  # no run_config in its training_state.json
    (out / "training_config.json").write_text(json.dumps({"config_file": None, **config_in(out).as_dict()}))
    assert plan_output_folder(config_in(out, max_train_steps=50)).action == "resume"
    with pytest.raises(ConfigError, match="its config differs: lora_rank 4 -> 16"):
        plan_output_folder(config_in(out, lora_rank=16))
    (out / "training_config.json").unlink()
    with pytest.raises(ConfigError, match="nothing records the config that wrote them"):
        plan_output_folder(config_in(out))


def test_latest_on_the_command_line_continues_another_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    newest = fake_checkpoint(out, 20, config_in(out))
    changed = config_in(out, lora_rank=8, resume_from_checkpoint="latest")
    plan = plan_output_folder(changed, command_line={"resume_from_checkpoint"})
    assert (plan.action, plan.resume_from_checkpoint) == ("continue", str(newest))
    assert plan.note.endswith("with changed options: lora_rank 4 -> 8")


def test_latest_in_a_config_file_is_the_default_behaviour_not_an_override(tmp_path: Path) -> None:
    """What the wizard writes: resumes the same run, still refuses another one."""
    out = tmp_path / "out"
    fake_checkpoint(out, 20, config_in(out))
    assert plan_output_folder(config_in(out, resume_from_checkpoint="latest")).action == "resume"
    with pytest.raises(ConfigError, match="holds checkpoints of another run"):
        plan_output_folder(config_in(out, lora_rank=8, resume_from_checkpoint="latest"))


def test_a_named_checkpoint_must_exist_before_anything_loads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_checkpoint(out, 20, config_in(out))
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint: 'checkpoint-30' is not a folder"):
        plan_output_folder(config_in(out, resume_from_checkpoint="checkpoint-30"))
    assert plan_output_folder(config_in(out, resume_from_checkpoint="checkpoint-20")).action == "continue"


def test_resume_none_starts_over_only_in_a_folder_without_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert plan_output_folder(config_in(out, resume_from_checkpoint="none")).action == "fresh"
    assert ckpt.resolve_resume_path(out, "None") is None
    fake_checkpoint(out, 20, config_in(out))
    with pytest.raises(ConfigError, match="`--resume_from_checkpoint none` starts over, but `--output_dir` .* holds "
                                          r"checkpoints \(newest: checkpoint-20\).*add `--overwrite_output_dir`"):
        plan_output_folder(config_in(out, resume_from_checkpoint="none"))
    plan = plan_output_folder(config_in(out, resume_from_checkpoint="none", overwrite_output_dir=True))
    assert plan.action == "overwrite"


def test_overwrite_moves_the_earlier_run_into_a_dated_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_checkpoint(out, 10, config_in(out))
    fake_checkpoint(out, 20, config_in(out))
    (out / "validation" / "step_20").mkdir(parents=True)
    (out / "validation" / "step_20" / "grid.png").write_bytes(b"png")
    (out / "logs" / "simpletuner" / "simpletuner-run").mkdir(parents=True)
    (out / "logs" / "simpletuner" / "simpletuner-run" / "events.out.tfevents.1").write_bytes(b"events")
    (out / "training_config.json").write_text("{}")
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (out / "my-notes.txt").write_text("mine")  # not written by a run: stays
    earlier = snapshot(out)
    config = config_in(out, lora_rank=8, overwrite_output_dir=True, resume_from_checkpoint="latest")
    plan = plan_output_folder(config, now=NOW)
    archive = out / "previous-run-20250102-030405"
    assert (plan.action, plan.archive, plan.resume_from_checkpoint) == ("overwrite", archive, None)
    assert snapshot(out) == earlier  # deciding moves nothing
    config = apply_folder_plan(plan, config)
    assert config.resume_from_checkpoint is None
    assert sorted(path.name for path in out.iterdir()) == ["my-notes.txt", archive.name]
    assert snapshot(archive) == {name: data for name, data in earlier.items() if name != "my-notes.txt"}
    assert ckpt.list_checkpoints(out) == []
    again = plan_output_folder(config_in(out, overwrite_output_dir=True), now=NOW)
    assert again.action == "fresh"  # earlier archives and the user's files are not a run


def test_overwrite_keeps_a_checkpoint_outside_the_folder_as_the_start(tmp_path: Path) -> None:
    elsewhere = fake_checkpoint(tmp_path / "other", 7, config_in(tmp_path / "other"))
    out = tmp_path / "out"
    inside = fake_checkpoint(out, 3, config_in(out))
    plan = plan_output_folder(config_in(out, overwrite_output_dir=True, resume_from_checkpoint=str(elsewhere)), now=NOW)
    assert plan.resume_from_checkpoint == str(elsewhere)
    with pytest.raises(ConfigError, match="remove one of the two options"):
        plan_output_folder(config_in(out, overwrite_output_dir=True, resume_from_checkpoint=str(inside)))


def test_overwrite_renames_a_tensorboard_run_outside_the_folder(tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "shared-logs"
    fake_checkpoint(out, 3, config_in(out))
    run_folder = logs / "simpletuner" / "simpletuner-run"
    run_folder.mkdir(parents=True)
    (run_folder / "events.out.tfevents.1").write_bytes(b"events")
    config = config_in(out, overwrite_output_dir=True, logging_dir=str(logs))
    apply_folder_plan(plan_output_folder(config, now=NOW), config)
    assert not run_folder.exists()
    renamed = logs / "simpletuner" / "simpletuner-run-previous-run-20250102-030405"
    assert (renamed / "events.out.tfevents.1").read_bytes() == b"events"


def test_only_the_main_process_moves_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake_checkpoint(out, 3, config_in(out))
    config = config_in(out, overwrite_output_dir=True)
    plan = plan_output_folder(config, now=NOW)
    assert apply_folder_plan(plan, config, move=False).resume_from_checkpoint is None
    assert [info.step for info in ckpt.list_checkpoints(out)] == [3]


# --- TensorBoard -------------------------------------------------------------------------------------


def test_a_resumed_tracker_hides_the_steps_logged_after_its_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simpletuner.testing.config import make_config
    from simpletuner.tracking.trackers import accelerator_tracking_arguments, build_tracker

    def tracker():
        AcceleratorState._reset_state(True)
        config = make_config(output_dir=str(tmp_path), report_to="tensorboard")
        accelerator = Accelerator(**accelerator_tracking_arguments(config, tmp_path))
        return build_tracker(accelerator, config, tmp_path, is_main_process=True)

    first = tracker()
    for step in range(1, 6):  # the interrupted run got to step 5, its last checkpoint was step 3
        first.log_scalars({"loss/train": float(step)}, step)
    first.close()
    resumed = tracker()
    resumed.continue_from(3)
    run_folder = tmp_path / "logs" / "simpletuner" / "simpletuner-run"
    assert len(list(run_folder.glob("events.*"))) == 1  # the new event file opens at the first value
    for step in range(4, 7):
        resumed.log_scalars({"loss/train": 10.0 * step}, step)
    with pytest.raises(RuntimeError, match="before the first logged value"):
        resumed.continue_from(5)
    resumed.close()
    events = EventAccumulator(str(run_folder))
    events.Reload()
    points = [(event.step, event.value) for event in events.Scalars("loss/train")]
    assert points == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


# --- through the command line ------------------------------------------------------------------------


def _train(project: Path, output: str, *extra: str, **overrides) -> int:
    from simpletuner.cli import main

    values = {"checkpoint_step_interval": 2, "max_train_steps": 4, "optimizer": "optimi-adamw", **overrides}
    return main(["train", *run_args(project, output, **values), *extra])


@pytest.mark.slow
def test_running_the_same_command_again_resumes_and_another_config_is_refused(project: Path, caplog,
                                                                               capsys, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    out = project / "rerun"
    assert _train(project, "rerun", report_to="tensorboard") == 0
    assert [info.step for info in ckpt.list_checkpoints(out)] == [2, 4]
    first_checkpoint = snapshot(out / "checkpoint-2")

    caplog.clear()
    with caplog.at_level("INFO"):
        assert _train(project, "rerun", report_to="tensorboard", max_train_steps=6) == 0
    assert "\nstart:        resuming from checkpoint-4: " in caplog.text  # in the start-up summary
    assert "resumed from" in caplog.text and "at step 4" in caplog.text
    assert [info.step for info in ckpt.list_checkpoints(out)] == [2, 4, 6]
    assert snapshot(out / "checkpoint-2") == first_checkpoint
    assert ckpt.read_training_state(out / "checkpoint-6")["max_steps"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "simpletuner" / "simpletuner-run"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/train")] == [1, 2, 3, 4, 5, 6]

    import simpletuner.training.trainer as trainer_module

    def no_training(*args, **kwargs):
        raise AssertionError("the refusal must come before training starts")

    monkeypatch.setattr(trainer_module, "train", no_training)
    before = snapshot(out)
    capsys.readouterr()
    assert _train(project, "rerun", max_train_steps=6, lora_rank=8) == 2
    err = capsys.readouterr().err
    assert f"`--output_dir` {out} holds checkpoints of another run (newest: checkpoint-6); its config differs: " \
           "lora_rank 16 -> 8." in err
    assert snapshot(out) == before  # training_config.json included: nothing was written


@pytest.mark.slow
def test_overwrite_output_dir_starts_over_beside_the_archived_run(project: Path, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    out = project / "overwrite"
    assert _train(project, "overwrite") == 0
    earlier = snapshot(out)
    assert _train(project, "overwrite", "--overwrite_output_dir", lora_rank=8, max_train_steps=2) == 0
    archives = [path for path in out.iterdir() if path.name.startswith("previous-run-")]
    assert len(archives) == 1
    assert snapshot(archives[0]) == earlier  # the earlier run, byte for byte
    assert [info.step for info in ckpt.list_checkpoints(out)] == [2]
    assert ckpt.read_training_state(out / "checkpoint-2")[RUN_CONFIG_KEY]["lora_rank"] == 8
    assert json.loads((out / "training_config.json").read_text())["lora_rank"] == 8
    assert os.path.exists(out / "pytorch_lora_weights.safetensors")
