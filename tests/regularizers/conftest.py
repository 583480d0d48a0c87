"""Shared by the regularizer tests: exact resume of a run whose regularizer keeps a projector and a gate."""

from __future__ import annotations

from pathlib import Path

import pytest


def assert_resumes_exactly(project: Path, family: str, name: str, regularizer_args: dict) -> None:
    """A run interrupted after step 3 and resumed from checkpoint-2 equals the uninterrupted run: the
    same losses, and regularizer ``name``'s projector and similarity average restored exactly."""
    import torch

    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.trainer import train
    from tests.models.conftest import family_args
    from tests.training.conftest import Interrupted, crash_after_step

    def config(output, **extra):
        args = family_args(project, family, output, max_train_steps=4, checkpoint_step_interval=2, **extra,
                           **regularizer_args)
        return resolve_run(args).config

    reference = train(config("ref"), show_progress=False)
    regularizer = next(item for item in reference.regularizers.items if item.name == name)
    assert (project / "ref" / "checkpoint-2" / f"regularizer-{name}.pt").is_file()
    with crash_after_step(3), pytest.raises(Interrupted):
        train(config("cut"), show_progress=False)
    resumed = train(config("cut", resume_from_checkpoint="latest"), show_progress=False)
    restored = next(item for item in resumed.regularizers.items if item.name == name)
    assert resumed.state.losses == reference.state.losses[2:]
    assert restored.gate.average == regularizer.gate.average is not None
    for mine, theirs in zip(restored.projector.parameters(), regularizer.projector.parameters()):
        assert torch.equal(mine, theirs)
