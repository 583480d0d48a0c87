"""Kill -9 a short training run at random points, resume it until it finishes, and check that the final
weights equal those of a run that was never interrupted (bit for bit, on the CPU).

Each trial kills one run once or twice, each time either

- at a random moment after training has started (SIGKILL to the whole process group), or
- at a random fault-injection point inside the checkpoint writer (``SIMPLETUNER_FAULT_INJECT``: after
  one of the checkpoint's files, before the manifest, before the rename, or while pruning an old
  checkpoint), for a random checkpoint still ahead of the run,

then resumes with ``--resume_from_checkpoint latest`` until the run exits cleanly. A trial passes when
every resumed run started from the newest complete checkpoint on disk, no hidden temp or trash
folder survives, and the final LoRA (and EMA) weights equal the uninterrupted run's exactly.

    python benchmarks/kill_sweep.py [--trials 20] [--seed 0] [--steps 18] [--work DIR]

Prints one line per trial and ``x/N exact``; exits 1 unless every trial is exact.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Files of a checkpoint of the sweep's run (LoRA, EMA), each an ``after_file=`` injection point.
CHECKPOINT_FILES = ("pytorch_lora_weights.safetensors", "optimizer.pt", "lr_scheduler.pt", "random_states.pt",
                    "sampler.json", "ema.pt", "training_state.json")
INTERVAL = 3
KEEP = 2
MAX_RESUMES = 6


def run_settings(steps: int) -> dict:
    """Everything that must continue exactly: EMA, a warmed-up cosine schedule, accumulation, caption
    dropout, and pruning (a limit of 2) so kills can land while an old checkpoint is deleted."""
    return dict(max_train_steps=steps, checkpoint_step_interval=INTERVAL, checkpoints_total_limit=KEEP,
                use_ema="true", lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2,
                caption_dropout_probability=0.3)


@dataclass
class Trial:
    index: int
    kills: list[str] = field(default_factory=list)
    resumed_at: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    difference: float | None = None

    @property
    def exact(self) -> bool:
        return not self.problems and self.difference == 0.0

    def describe(self) -> str:
        verdict = "exact" if self.exact else "FAILED: " + "; ".join(self.problems or [f"max diff {self.difference}"])
        return (f"trial {self.index:2d}: kills [{', '.join(self.kills)}], resumed at steps {self.resumed_at} -> "
                f"{verdict}")


def choose_fault(rng: random.Random, resumable: int, steps: int) -> str:
    """A fault-injection point the coming run will actually reach: a checkpoint step after the one it
    resumes from (for pruning: an existing or coming checkpoint that a later save removes)."""
    ahead = [step for step in range(INTERVAL, steps + 1, INTERVAL) if step > resumable]
    prunable = [step for step in range(INTERVAL, steps + 1, INTERVAL)
                if step >= resumable and step + KEEP * INTERVAL <= steps]
    if prunable and rng.random() < 0.25:
        return f"during_prune:kill@{rng.choice(prunable)}"
    point = rng.choice([f"after_file={name}" for name in CHECKPOINT_FILES] + ["before_manifest", "before_rename"])
    return f"{point}:kill@{rng.choice(ahead)}"


def run_trial(index: int, rng: random.Random, project: Path, steps: int, training_seconds: float,
              reference: dict) -> Trial:
    from simpletuner.testing.kill_runs import (final_weights, max_difference, newest_resumable_step, run_train,
                                               train_argv)

    trial = Trial(index)
    output = project / f"trial-{index}"
    argv = train_argv(project, output, **run_settings(steps))
    planned_kills = rng.choice((1, 2))
    for attempt in range(planned_kills + MAX_RESUMES):
        expected = newest_resumable_step(output)
        if expected >= steps:
            planned_kills = min(planned_kills, attempt)  # nothing left to interrupt
        fault, delay = None, None
        if attempt < planned_kills:
            if rng.random() < 0.5:
                fault = choose_fault(rng, expected, steps)
                trial.kills.append(f"inject {fault}")
            else:
                delay = rng.uniform(0.0, training_seconds * (steps - expected) / steps)
                trial.kills.append(f"at {delay:.2f}s")
        result = run_train(argv, cwd=project, fault=fault, kill_after_training_starts=delay)
        started = result.resumed_step()
        trial.resumed_at.append(started)
        if started is not None and started != expected:
            trial.problems.append(f"run {attempt + 1} resumed at step {started}, newest complete was {expected}")
        if delay is not None and not result.killed_by_timer:
            trial.kills[-1] += " (the run ended first)"
        if result.returncode == 0:
            break
        if not result.killed:
            trial.problems.append(f"run {attempt + 1} exited with {result.returncode}: {result.log[-800:]}")
            return trial
    else:
        trial.problems.append(f"did not finish after {MAX_RESUMES} resumes")
        return trial
    leftovers = [entry.name for entry in output.iterdir() if entry.name.startswith(".")]
    if leftovers:
        trial.problems.append(f"left behind {leftovers}")
    trial.difference = max_difference(final_weights(output), reference)
    return trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=18, help="optimizer steps of each run (a multiple of 3)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the project and runs (default: a temp dir)")
    args = parser.parse_args(argv)

    from simpletuner.testing.kill_runs import final_weights, run_train, train_argv
    from simpletuner.testing.projects import make_family_project

    work = args.work or Path(tempfile.mkdtemp(prefix="kill-sweep-"))
    project = make_family_project(work, "sd1x")
    began = time.monotonic()
    result = run_train(train_argv(project, project / "reference", **run_settings(args.steps)), cwd=project)
    if result.returncode != 0 or result.training_seconds is None:
        print(f"the uninterrupted run failed:\n{result.log[-3000:]}", file=sys.stderr)
        return 2
    reference = final_weights(project / "reference")
    print(f"reference run: {args.steps} steps, {result.training_seconds:.1f}s of training after setup; work in {work}",
          flush=True)
    rng = random.Random(args.seed)
    exact = 0
    for index in range(1, args.trials + 1):
        trial = run_trial(index, rng, project, args.steps, result.training_seconds, reference)
        exact += trial.exact
        print(trial.describe(), flush=True)
    print(f"{exact}/{args.trials} exact ({time.monotonic() - began:.0f}s)")
    return 0 if exact == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
