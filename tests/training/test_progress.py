"""The progress bar's rate and remaining time, and the recorded step time, count training steps only:
a slow validation between two steps leaves them at the steps' own pace."""

from __future__ import annotations

import io
import re
import time

import pytest

torch = pytest.importorskip("torch")

from simpletuner.training.progress import shift_bar_clock, training_progress_bar  # noqa: E402
from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.training.conftest import config_for  # noqa: E402

#: One bar line: steps done, remaining time and rate, as tqdm writes "3/6 [00:05<00:01,  2.10it/s".
BAR = re.compile(r"(\d+)/(\d+) \[[\d:]+<([\d:?]+), +([\d.]+)(s/it|it/s)")
VALIDATION_SECONDS = 4.0


def seconds_per_step(rate: str, unit: str) -> float:
    return float(rate) if unit == "s/it" else 1 / float(rate)


def remaining_seconds(text: str) -> float:
    minutes, seconds = text.split(":")[-2:]
    return 60 * int(minutes) + int(seconds)


def test_paused_time_does_not_reach_the_rate() -> None:
    """With a fake clock: 1 s per step, then 10 s of validation, then a 1-s step reads 1 it/s."""
    clock = [0.0]
    bar = training_progress_bar(10, 0, True, file=io.StringIO(), mininterval=0, smoothing=1.0)
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(2):
        clock[0] += 1.0
        bar.update(1)
    clock[0] += 10.0  # validation
    shift_bar_clock(bar, 10.0)
    clock[0] += 1.0
    bar.update(1)
    assert bar.format_dict["rate"] == pytest.approx(1.0)
    assert bar.format_dict["elapsed"] == pytest.approx(13.0)  # the elapsed time stays the wall-clock time
    shift_bar_clock(training_progress_bar(10, 0, False), 5.0)  # a hidden bar (other processes) is left alone


def test_slow_validation_leaves_rate_eta_and_step_time_alone(project, monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr(Trainer, "progress_bar", lambda self: training_progress_bar(
        self.max_steps, self.state.global_step, True, file=shown, mininterval=0))
    validated = []

    def slow_validation(self, step):
        validated.append(step)
        time.sleep(VALIDATION_SECONDS)

    monkeypatch.setattr(Trainer, "validate", slow_validation)
    config = config_for(project, "paced", max_train_steps=6, validation_prompt="a red circle",
                        validation_step_interval=3)
    trainer = train(config, show_progress=True)
    assert validated == [3, 6]

    readings = {int(done): (remaining_seconds(left), seconds_per_step(rate, unit))
                for done, _, left, rate, unit in BAR.findall(shown.getvalue().replace("\r", "\n"))}
    step_time = max(trainer.state.step_seconds)
    assert step_time < 1.0, trainer.state.step_seconds  # the recorded step times exclude the validation
    for done in (4, 5):  # the steps right after the validation at step 3
        left, per_step = readings[done]
        assert per_step < 1.0, (done, per_step, shown.getvalue()[-600:])
        assert left <= 2 * (6 - done) * max(step_time, 0.5)
