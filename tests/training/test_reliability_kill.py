"""``kill -9`` while a checkpoint is being written or an old one pruned, then resume: the resumed run
starts from the newest complete checkpoint and ends with exactly the weights of a run that was never
interrupted. Real ``simpletuner train`` processes; the kill comes from the checkpoint writer's
fault-injection points (``SIMPLETUNER_FAULT_INJECT``). ``benchmarks/kill_sweep.py`` does the same at
random points, many times."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from simpletuner.testing.kill_runs import (  # noqa: E402
    final_weights, max_difference, newest_resumable_step, run_train, train_argv)
from simpletuner.training import checkpoint as ckpt  # noqa: E402

pytestmark = pytest.mark.slow

RUN = dict(max_train_steps=6, checkpoint_step_interval=2, checkpoints_total_limit=2, use_ema="true")


@pytest.fixture(scope="module")
def reference(project) -> dict:
    result = run_train(train_argv(project, project / "kill-reference", **RUN), cwd=project)
    assert result.returncode == 0, result.log[-3000:]
    return final_weights(project / "kill-reference")


@pytest.mark.parametrize("fault, resumes_at, leftover", [
    ("after_file=optimizer.pt:kill@4", 2, ckpt.TEMP_PREFIX),  # checkpoint-4 half written
    ("during_prune:kill@2", 6, ckpt.TRASH_PREFIX),  # checkpoint-2 renamed to trash, not yet deleted
])
def test_kill_inside_the_checkpoint_writer_then_resume_is_exact(project, reference, fault, resumes_at, leftover):
    output = project / f"kill-{fault.split(':')[0].replace('=', '-')}"
    argv = train_argv(project, output, **RUN)
    killed = run_train(argv, cwd=project, fault=fault)
    assert killed.killed, killed.log[-3000:]
    assert [entry.name for entry in output.iterdir() if entry.name.startswith(leftover)]
    assert newest_resumable_step(output) == resumes_at

    resumed = run_train(argv, cwd=project)
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert resumed.resumed_step() == resumes_at
    assert not [entry.name for entry in output.iterdir() if entry.name.startswith(".")]
    assert [info.step for info in ckpt.list_checkpoints(output)] == [4, 6]
    assert max_difference(final_weights(output), reference) == 0.0
