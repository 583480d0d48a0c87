"""A NaN or infinite loss: caught at its step with a message that tells the truth about the usable
checkpoint, never written into a checkpoint, and skippable with ``--nan_action skip_batch``; a loss
spike marks the checkpoint saved during it as suspect, and ``latest`` passes over it."""

from __future__ import annotations

import json
import logging
import math

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.methods.sft import LossOutput, SupervisedFineTuning  # noqa: E402
from simpletuner.training import checkpoint as ckpt  # noqa: E402
from simpletuner.training.nan_guard import MAX_CONSECUTIVE_SKIPS, SPIKE_FACTOR, loss_spike  # noqa: E402
from simpletuner.training.trainer import train  # noqa: E402
from tests.training.conftest import config_for, run_args  # noqa: E402


@pytest.fixture()
def nan_at(monkeypatch):
    """``nan_at(3, 4)``: the first loss computed for optimizer steps 3 and 4 (counted from 1) is NaN
    (every one with ``always``); returns the steps at which the method was asked for a loss."""
    asked: list[int] = []

    def arm(*steps: int, value: float = math.nan, always: bool = False) -> list[int]:
        original = SupervisedFineTuning.compute_loss

        def compute_loss(self, batch, device, step=0):
            output = original(self, batch, device, step=step)
            first = step + 1 not in asked
            asked.append(step + 1)
            if step + 1 in steps and (first or always):
                return LossOutput(output.loss * value, output.logs)
            return output

        monkeypatch.setattr(SupervisedFineTuning, "compute_loss", compute_loss)
        return asked

    return arm


def test_nan_stop_before_any_checkpoint_says_there_is_none(project, nan_at, capsys):
    nan_at(3)
    argv = run_args(project, "nan-early", optimizer="optimi-adamw", max_train_steps=6, checkpoint_step_interval=5)
    assert main(["train", *argv]) == 1
    error = capsys.readouterr().err
    assert "loss became nan at step 3 (learning rate 0.001)" in error
    assert "No checkpoint was written yet in" in error and "--nan_action skip_batch" in error
    assert "intact" not in error
    assert not list((project / "nan-early").glob("checkpoint-*"))


def test_nan_stop_names_the_newest_checkpoint_and_none_is_written_after_it(project, nan_at):
    nan_at(3, value=math.inf)
    config = config_for(project, "nan-late", max_train_steps=6, checkpoint_step_interval=1,
                        lr_scheduler="linear", lr_warmup_steps=0)
    with pytest.raises(FloatingPointError) as caught:
        train(config, show_progress=False)
    message = str(caught.value)
    expected_lr = 1e-3 * (1 - 2 / 6)  # linear decay after 2 steps: the rate step 3 trained with
    assert f"loss became inf at step 3 (learning rate {expected_lr:.3g})" in message
    assert "checkpoint-2 (step 2) is the newest complete checkpoint" in message
    assert "--resume_from_checkpoint latest continues from it" in message
    assert sorted(p.name for p in (project / "nan-late").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_gradient_accumulation_names_each_micro_batch_loss(project, monkeypatch):
    original = SupervisedFineTuning.compute_loss
    calls: list[int] = []

    def second_micro_batch_of_step_2(self, batch, device, step=0):
        output = original(self, batch, device, step=step)
        calls.append(step)
        return LossOutput(output.loss * math.nan, output.logs) if len(calls) == 4 else output

    monkeypatch.setattr(SupervisedFineTuning, "compute_loss", second_micro_batch_of_step_2)
    with pytest.raises(FloatingPointError, match=r"at step 2 \(micro-batch losses [0-9.]+, nan; learning rate 0.001\)"):
        train(config_for(project, "nan-accumulate", max_train_steps=3, gradient_accumulation_steps=2),
              show_progress=False)
    assert calls == [0, 0, 1, 1]


def test_skip_batch_drops_the_update_and_keeps_going_with_finite_weights(project, nan_at, caplog):
    asked = nan_at(3)
    config = config_for(project, "nan-skip", max_train_steps=5, checkpoint_step_interval=1, nan_action="skip_batch",
                        lr_scheduler="linear", lr_warmup_steps=0, use_ema="true")
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        trainer = train(config, show_progress=False)
    assert asked == [1, 2, 3, 3, 4, 5]  # the bad batch's step is tried again with the next batch
    assert trainer.state.global_step == 5 and len(trainer.state.losses) == 5
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    assert trainer.lr_scheduler.last_epoch == 5  # the LR schedule did not move for the dropped batch
    assert trainer.ema.updates_seen == 5
    assert trainer.nan_guard.skipped == 1 and trainer.nan_guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in trainer.trainable)
    warning = next(r.getMessage() for r in caplog.records if "skipped the batch" in r.getMessage())
    assert "loss became nan at step 3" in warning and "1 in a row, 1 in this run" in warning
    assert [info.step for info in ckpt.list_checkpoints(project / "nan-skip")] == [1, 2, 3, 4, 5]


def test_skip_batch_gives_up_after_too_many_bad_batches_in_a_row(project, nan_at):
    nan_at(2, always=True)
    config = config_for(project, "nan-give-up", max_train_steps=40, checkpoint_step_interval=1, nan_action="skip_batch")
    with pytest.raises(FloatingPointError) as caught:
        train(config, show_progress=False)
    message = str(caught.value)
    assert f"that is {MAX_CONSECUTIVE_SKIPS} batches in a row with a non-finite loss" in message
    assert "loss became nan at step 2" in message and "checkpoint-1 (step 1) is the newest" in message
    assert [info.step for info in ckpt.list_checkpoints(project / "nan-give-up")] == [1]


def test_a_checkpoint_of_non_finite_weights_is_refused(project):
    trainer = train(config_for(project, "nan-weights", max_train_steps=2, checkpoint_step_interval=1),
                    show_progress=False)
    with torch.no_grad():
        trainer.trainable[3].view(-1)[0] = math.inf
    trainer.state.global_step = 3
    with pytest.raises(ckpt.CheckpointError) as caught:
        trainer.save_checkpoint()
    message = str(caught.value)
    assert "refusing to write checkpoint-3: 1 of the" in message and "hold NaN or inf values (the first is " in message
    assert "lora" in message and "checkpoint-2 (step 2) is the newest complete checkpoint" in message
    assert not (project / "nan-weights" / "checkpoint-3").exists()


# --- loss spikes ------------------------------------------------------------------------------------------


def test_loss_spike_needs_history_and_a_sustained_rise():
    steady = [0.1, 0.3, 0.05, 0.2] * 10
    assert loss_spike(steady) is None
    assert loss_spike(steady + [5.0, 0.1, 0.2, 0.1, 0.3]) is None  # one high-noise step is no spike
    assert loss_spike([0.1] * 10 + [50.0] * 5) is None  # too little history to judge
    reason = loss_spike(steady + [40.0, 80.0, 1e6, 60.0, 90.0])
    assert reason is not None and "median loss of the last 5 steps 80" in reason and "40 steps before" in reason
    assert loss_spike(steady + [SPIKE_FACTOR * 0.15 * 0.9] * 5) is None


def test_a_checkpoint_saved_during_a_spike_is_marked_and_latest_skips_it(project, caplog):
    trainer = train(config_for(project, "spike", max_train_steps=2, checkpoint_step_interval=1), show_progress=False)
    trainer.state.losses = [0.1] * 30 + [50.0] * 5
    trainer.state.global_step = 3
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        folder = trainer.save_checkpoint()
    state = json.loads((folder / "training_state.json").read_text())
    assert state["suspect"] is True and "500x the median" in state["suspect_reason"]
    assert "checkpoint-3 is marked suspect" in caplog.text
    caplog.clear()
    out = project / "spike"
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        assert ckpt.resolve_resume_path(out, "latest") == out / "checkpoint-2"
    assert "skipping checkpoint-3, marked suspect" in caplog.text
    assert ckpt.resolve_resume_path(out, "checkpoint-3") == folder  # named explicitly: used as it is
    note = ckpt.newest_checkpoint_note(out)
    assert "checkpoint-3 (step 3) is the newest complete checkpoint" in note and "marked suspect" in note
    assert "checkpoint-2 (step 2) is the newest one not marked suspect" in note


def test_latest_refuses_to_guess_when_every_checkpoint_is_suspect(tmp_path):
    for step in (1, 2):
        ckpt.write_checkpoint(tmp_path, step, {"a.bin": lambda p: p.write_bytes(b"a")},
                              {"global_step": step, "suspect": True})
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint in .* is marked suspect.*checkpoint-2"):
        ckpt.resolve_resume_path(tmp_path, "latest")


def test_retention_keeps_the_newest_trusted_checkpoint_when_suspect_ones_fill_the_limit(tmp_path, caplog):
    for step, suspect in ((1, False), (2, False), (3, True), (4, True)):
        ckpt.write_checkpoint(tmp_path, step, {"a.bin": lambda p: p.write_bytes(b"a")},
                              {"global_step": step, "suspect": suspect})
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [path.name for path in removed] == ["checkpoint-1"]
    assert sorted(info.step for info in ckpt.list_checkpoints(tmp_path)) == [2, 3, 4]
    assert "keeping checkpoint-2 beyond --checkpoints_total_limit" in caplog.text
    assert ckpt.resolve_resume_path(tmp_path, "latest") == tmp_path / "checkpoint-2"


def test_the_stop_message_says_whether_the_bad_update_was_applied():
    """DeepSpeed ZeRO steps inside the backward pass: the update of a bad batch is in the weights already."""
    from simpletuner.testing.config import make_config
    from simpletuner.training.nan_guard import NanGuard

    plain, zero = NanGuard.from_config(make_config()), NanGuard.from_config(make_config(zero_stage=2))
    with pytest.raises(FloatingPointError, match=r"the update of that batch was not applied"):
        plain.nonfinite_step(3, math.nan, 1e-3, "checkpoint-2 is the newest")
    with pytest.raises(FloatingPointError, match=r"DeepSpeed's engine had already applied the update of that batch, "
                                                 r"so resume from a checkpoint.*checkpoint-2 is the newest"):
        zero.nonfinite_step(3, math.nan, 1e-3, "checkpoint-2 is the newest")
