"""Real ``simpletuner train`` processes that get killed and resumed: shared by the kill tests and
``benchmarks/kill_sweep.py``.

Each run is a separate process (the only way to test ``kill -9``), started with the same environment
so an interrupted-and-resumed run can be compared bit for bit with an uninterrupted one on the CPU.
Faults inside the checkpoint writer come from ``SIMPLETUNER_FAULT_INJECT`` (training/checkpoint.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: Set by the checkpoint writer's fault-injection points (``<point>:<action>[@<step>]``).
FAULT_INJECT_ENV = "SIMPLETUNER_FAULT_INJECT"
#: What a run that resumed logs, and what one that found nothing to resume logs.
_RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
_FRESH = "yet: starting from step 0"
#: The progress bar's first frame: setup is over and the first step is under way.
_TRAINING_STARTED = re.compile(r"training:\s+\d+%")


def train_argv(root: Path, output: Path, **overrides) -> list[str]:
    """Flags for a short sd1x LoRA run on a :func:`~simpletuner.testing.projects.make_family_project`
    folder, resuming from ``latest`` (harmless on the first run)."""
    values = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
        "output_dir": str(output), "data_backend_config": str(root / "multidatabackend.json"),
        "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel", "aspect_bucket_alignment": 8,
        "mixed_precision": "no", "train_batch_size": 2, "seed": 7, "learning_rate": 1e-3, "report_to": "none",
        "disable_benchmark": "true", "optimizer": "optimi-adamw", "resume_from_checkpoint": "latest",
    }
    values.update(overrides)
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


@dataclass
class RunResult:
    returncode: int
    log: str
    killed_by_timer: bool = False
    #: From the first progress-bar frame to the end of the process (None when it never got there).
    training_seconds: float | None = None

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def resumed_step(self) -> int | None:
        """The step this run resumed at (0 when it found no checkpoint), or None when it never got there."""
        found = _RESUMED.search(self.log)
        if found:
            return int(found.group(2))
        return 0 if _FRESH in self.log else None


def _environment(fault: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != FAULT_INJECT_ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    if fault:
        env[FAULT_INJECT_ENV] = fault
    return env


def run_train(argv: list[str], cwd: Path, fault: str | None = None, kill_after_training_starts: float | None = None,
              timeout: float = 600) -> RunResult:
    """Run ``simpletuner train argv`` to the end, or until a fault kills it. With
    ``kill_after_training_starts`` the process gets SIGKILL that many seconds after its progress bar
    first appears (the setup before it takes most of a tiny run's time and is not what is tested)."""
    command = [sys.executable, "-m", "simpletuner.cli", "train", *argv]
    process = subprocess.Popen(command, cwd=cwd, env=_environment(fault), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=_collect, args=(process, chunks), daemon=True)
    reader.start()
    killed_by_timer = False
    deadline = time.monotonic() + timeout
    started_at = None
    while process.poll() is None:
        now = time.monotonic()
        if now > deadline:
            _kill_group(process)
            raise TimeoutError(f"simpletuner train did not finish in {timeout}s: {''.join(chunks)[-2000:]}")
        if started_at is None and _TRAINING_STARTED.search("".join(chunks)):
            started_at = now
        if kill_after_training_starts is not None and started_at is not None \
                and now - started_at >= kill_after_training_starts:
            _kill_group(process)
            killed_by_timer = True
            break
        time.sleep(0.005)
    process.wait()
    ended = time.monotonic()
    reader.join(timeout=10)
    return RunResult(process.returncode, "".join(chunks), killed_by_timer,
                     None if started_at is None else ended - started_at)


def _collect(process: subprocess.Popen, chunks: list[str]) -> None:
    """Read the merged output as it comes (the progress bar writes without newlines)."""
    while True:
        data = process.stdout.read1(65536)
        if not data:
            return
        chunks.append(data.decode("utf-8", errors="replace"))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def final_weights(output: Path) -> dict:
    """The tensors of the final LoRA file (and the EMA copy when there is one), by name."""
    from safetensors.torch import load_file

    weights = {name: tensor for name, tensor in load_file(str(output / "pytorch_lora_weights.safetensors")).items()}
    ema = output / "ema" / "pytorch_lora_weights.safetensors"
    if ema.is_file():
        weights.update({f"ema/{name}": tensor for name, tensor in load_file(str(ema)).items()})
    return weights


def max_difference(ours: dict, theirs: dict) -> float:
    """The largest absolute difference between two weight sets; inf when their names differ."""
    if ours.keys() != theirs.keys():
        return float("inf")
    return max(float((ours[name].double() - theirs[name].double()).abs().max()) for name in ours)


def newest_resumable_step(output: Path) -> int:
    """What ``--resume_from_checkpoint latest`` must pick now: the newest complete, unmarked checkpoint."""
    from simpletuner.training.checkpoint import list_checkpoints

    trusted = [info.step for info in list_checkpoints(output) if not info.suspect]
    return trusted[-1] if trusted else 0
