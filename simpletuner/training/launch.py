"""Multi-process launch: re-execute ``simpletuner train`` under ``accelerate launch``.

``config.env``'s TRAINING_NUM_PROCESSES > 1 means one process per device. accelerate does the
process-group work; we only build its command line. Without GPUs, accelerate's ``--cpu`` flag
silently starts a single process, so the CPU path uses ``--multi_gpu`` with ACCELERATE_USE_CPU=1,
which gives real multi-process training over gloo.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
from typing import Sequence

logger = logging.getLogger(__name__)

LAUNCHED_MARKER = "SIMPLETUNER_LAUNCHED"


def needs_relaunch(launcher) -> bool:
    """True in the user's process when several processes are requested and we are not one of them."""
    return launcher.num_processes > 1 and not os.environ.get(LAUNCHED_MARKER) and "LOCAL_RANK" not in os.environ


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(launcher, argv: Sequence[str], has_gpu: bool) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command and the extra environment it needs."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(launcher.num_processes), "--num_machines", "1",
        "--dynamo_backend", launcher.dynamo_backend or "no",
        "--main_process_port", str(_free_port()), "--multi_gpu",
    ]
    env = {LAUNCHED_MARKER: "1"}
    if not has_gpu:
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--mixed_precision", "no"]
    command += list(launcher.accelerate_extra_args)
    command += ["-m", "simpletuner.cli", "train", *argv]
    return command, env


def relaunch_under_accelerate(launcher, argv: Sequence[str]) -> int:
    """Run the training in ``launcher.num_processes`` processes and return their exit code."""
    import torch

    command, extra_env = accelerate_command(launcher, argv, has_gpu=torch.cuda.is_available())
    printable = " ".join(f"{k}={v}" for k, v in extra_env.items()) + " " + shlex.join(command)
    logger.info("launching %d processes: %s", launcher.num_processes, printable)
    print(f"launch: {printable}", flush=True)
    return subprocess.call(command, env={**os.environ, **extra_env})
