"""The evaluation loss on held-out ``eval`` datasets (``--eval_*``): schedule, determinism, keys,
dataset filtering, no effect on training, and the config rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.training.conftest import config_for


@pytest.fixture(scope="module")
def eval_project(project) -> Path:
    """The sd1x ``project`` plus two eval datasets (4 and 2 images) in ``eval_datasets.json``."""
    from simpletuner.testing.shapes import make_demo_dataset

    make_demo_dataset(project / "held_a", 4, size=64, seed=11)
    make_demo_dataset(project / "held_b", 2, size=64, seed=12)
    entries = json.loads((project / "multidatabackend.json").read_text())
    for name in ("held_a", "held_b"):
        entries.append({"id": name, "type": "local", "dataset_type": "eval", "instance_data_dir": str(project / name),
                        "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel"})
    (project / "eval_datasets.json").write_text(json.dumps(entries))
    return project


def _run(root: Path, output: str, monkeypatch, **flags):
    """Train; returns (trainer, [(step, scalars)] of every eval/ log call)."""
    from simpletuner.tracking.trackers import NullTracker
    from simpletuner.training.trainer import train

    logged: list[tuple[int, dict]] = []

    def capture(self, scalars, step):  # --report_to none: the NullTracker's calls, recorded
        evals = {key: value for key, value in scalars.items() if key.startswith("eval/")}
        if evals:
            logged.append((step, evals))

    monkeypatch.setattr(NullTracker, "log_scalars", capture)
    flags.setdefault("data_backend_config", str(root / "eval_datasets.json"))
    trainer = train(config_for(root, output, **flags), show_progress=False)
    return trainer, logged


def test_eval_loss_is_logged_on_schedule_and_deterministic(eval_project, monkeypatch):
    trainer, logged = _run(eval_project, "eval-steps", monkeypatch, max_train_steps=4, eval_steps_interval=2,
                           eval_timesteps=3, eval_dataset_pooling="true")
    assert [step for step, _ in logged] == [2, 4]
    for _, scalars in logged:
        assert set(scalars) == {"eval/loss/held_a", "eval/loss/held_b", "eval/loss"}
        assert all(math.isfinite(value) for value in scalars.values())
        # pooled = image-weighted mean (4 and 2 images)
        expected = (4 * scalars["eval/loss/held_a"] + 2 * scalars["eval/loss/held_b"]) / 6
        assert scalars["eval/loss"] == pytest.approx(expected, rel=1e-9)
    assert logged[0][1] != logged[1][1]  # the weights moved between steps 2 and 4
    # the same weights give the same numbers, and evaluating leaves the global random state alone
    import torch

    before = torch.get_rng_state()
    assert trainer.evaluate(4) == logged[1][1]
    assert trainer.evaluate(4) == logged[1][1]
    assert torch.equal(before, torch.get_rng_state())
    assert trainer.model.denoiser.training  # back in training mode


def test_eval_does_not_change_training_and_repeats_across_runs(eval_project, monkeypatch):
    plain, none_logged = _run(eval_project, "eval-none", monkeypatch, max_train_steps=4)
    assert none_logged == []  # eval datasets alone schedule nothing
    first, logged_first = _run(eval_project, "eval-a", monkeypatch, max_train_steps=4, eval_steps_interval=1)
    second, logged_second = _run(eval_project, "eval-b", monkeypatch, max_train_steps=4, eval_steps_interval=1)
    assert first.state.losses == plain.state.losses  # exact: evaluation draws no global random numbers
    assert [step for step, _ in logged_first] == [1, 2, 3, 4]
    assert logged_first == logged_second
    assert "eval/loss" not in logged_first[0][1]  # pooled only with --eval_dataset_pooling


def test_epoch_interval_dataset_filter_and_no_double_run(eval_project, monkeypatch):
    # 4 steps per epoch: 0.5 epochs = every 2 steps; with --eval_steps_interval 2 too, still once per step
    _, logged = _run(eval_project, "eval-epoch", monkeypatch, max_train_steps=4, eval_epoch_interval=0.5,
                     eval_steps_interval=2, eval_dataset_id="held_b", eval_timesteps=1)
    assert [step for step, _ in logged] == [2, 4]
    assert all(set(scalars) == {"eval/loss/held_b"} for _, scalars in logged)


def test_unknown_eval_dataset_id_names_the_known_ones(eval_project, monkeypatch):
    from simpletuner.options import ConfigError

    with pytest.raises(ConfigError, match="held_a, held_b"):
        _run(eval_project, "eval-unknown", monkeypatch, max_train_steps=1, eval_steps_interval=1,
             eval_dataset_id="nope")


def test_eval_schedule_without_eval_dataset_is_an_error(eval_project, monkeypatch):
    from simpletuner.options import ConfigError

    with pytest.raises(ConfigError, match="dataset_type"):
        _run(eval_project, "eval-missing", monkeypatch, max_train_steps=1, eval_steps_interval=1,
             data_backend_config=str(eval_project / "multidatabackend.json"))


def test_eval_loss_disable_turns_it_off(eval_project, monkeypatch):
    _, logged = _run(eval_project, "eval-off", monkeypatch, max_train_steps=2, eval_steps_interval=1,
                     eval_loss_disable="true")
    assert logged == []


def test_fractional_epoch_schedule():
    from simpletuner.training.evaluation import EvalSchedule

    assert [s for s in range(13) if EvalSchedule(None, 0.5, 4).due(s)] == [2, 4, 6, 8, 10, 12]
    assert [s for s in range(10) if EvalSchedule(None, 1.5, 2).due(s)] == [3, 6, 9]
    assert [s for s in range(7) if EvalSchedule(None, 0.25, 2).due(s)] == [1, 2, 3, 4, 5, 6]
    assert [s for s in range(7) if EvalSchedule(3, 1.0, 2).due(s)] == [2, 3, 4, 6]


@pytest.mark.parametrize(("flags", "message"), [
    ({"eval_steps_interval": 0}, "--eval_steps_interval"),
    ({"eval_epoch_interval": -0.5}, "--eval_epoch_interval"),
    ({"eval_steps_interval": 2, "eval_timesteps": 0}, "--eval_timesteps"),
    ({"eval_timesteps": 4}, "without an evaluation schedule"),
    ({"eval_dataset_id": "held_a"}, "--eval_dataset_id"),
    ({"eval_dataset_pooling": "true"}, "--eval_dataset_pooling"),
    ({"evaluation_type": "clip", "eval_steps_interval": 2}, "--pretrained_evaluation_model_name_or_path"),
])
def test_eval_rules(eval_project, flags, message):
    from simpletuner.options import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_for(eval_project, "rules", **flags)


def test_eval_warnings(eval_project):
    from simpletuner.options.validation import collect_warnings

    config = config_for(eval_project, "warn", eval_steps_interval=2, eval_epoch_interval=1.0, eval_loss_disable="true")
    warnings = " ".join(collect_warnings(config))
    assert "either schedule" in warnings and "does nothing" in warnings


def test_resume_with_eval_repeats_the_uninterrupted_run(eval_project, monkeypatch):
    from tests.training.conftest import Interrupted, crash_after_step

    flags = {"max_train_steps": 4, "eval_steps_interval": 1, "checkpointing_steps": 2}
    reference, logged_reference = _run(eval_project, "eval-ref", monkeypatch, **flags)
    with crash_after_step(2), pytest.raises(Interrupted):
        _run(eval_project, "eval-cut", monkeypatch, **flags)
    resumed, logged_resumed = _run(eval_project, "eval-cut", monkeypatch, resume_from_checkpoint="latest", **flags)
    assert resumed.state.losses == reference.state.losses[2:]
    assert logged_resumed == logged_reference[2:]


def test_flow_matching_eval_loss_is_repeatable(tmp_path, monkeypatch):
    """sd3: the eval loss at fixed flow sigmas, equal for equal weights."""
    from simpletuner.testing.projects import make_family_project
    from simpletuner.testing.shapes import make_demo_dataset

    root = make_family_project(tmp_path, "sd3")
    make_demo_dataset(root / "held", 2, size=64, seed=5)
    entries = json.loads((root / "multidatabackend.json").read_text())
    entries.append({"id": "held", "type": "local", "dataset_type": "eval", "instance_data_dir": str(root / "held"),
                    "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel"})
    (root / "eval_datasets.json").write_text(json.dumps(entries))
    trainer, logged = _run(root, "flow", monkeypatch, model_family="sd3", max_train_steps=2, eval_steps_interval=2,
                           eval_timesteps=2)
    assert trainer.method.flow and [step for step, _ in logged] == [2]
    assert trainer.evaluate(2) == logged[0][1]
