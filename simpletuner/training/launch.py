"""Multi-process launch: re-execute ``simpletuner train`` under ``accelerate launch``.

``config.env`` (see :data:`simpletuner.options.files.LAUNCHER_VARIABLES`) says how many processes and
machines take part; accelerate does the process-group work and we only build its command line. The
workers run the same ``simpletuner train`` arguments in the same folder, so they resolve the same
config and config.env; the marker variable stops them from launching again.

Without GPUs, accelerate's ``--cpu`` flag silently starts a single process, so the CPU path uses
``--multi_gpu`` with ACCELERATE_USE_CPU=1, which gives real multi-process training over gloo.
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

#: Flags in ACCELERATE_EXTRA_ARGS that choose the distributed engine themselves (so no ``--multi_gpu``).
_ENGINE_FLAGS = ("--use_fsdp", "--use_deepspeed", "--use_megatron_lm", "--multi_gpu", "--tpu")


def needs_relaunch(launcher) -> bool:
    """True in the user's process when accelerate must start the training, and we are not one of its workers.

    That is: several processes or machines, or ACCELERATE_EXTRA_ARGS (e.g. DeepSpeed on one GPU).
    """
    wanted = launcher.num_processes > 1 or getattr(launcher, "num_machines", 1) > 1 or bool(launcher.accelerate_extra_args)
    return wanted and not os.environ.get(LAUNCHED_MARKER) and "LOCAL_RANK" not in os.environ


def _uses_deepspeed(config) -> bool:
    from simpletuner.training.deepspeed import uses_deepspeed

    return config is not None and uses_deepspeed(config)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the platform has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def _flag_names(args: Sequence[str]) -> set[str]:
    """``--use-fsdp=x`` -> ``--use_fsdp`` (accelerate accepts both spellings)."""
    return {"--" + token[2:].split("=", 1)[0].replace("-", "_") for token in args if token.startswith("--")}


def accelerate_command(launcher, argv: Sequence[str], has_gpu: bool, config=None) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command and the extra environment it needs.

    ``config`` (the resolved TrainConfig) supplies ``--mixed_precision`` and the dynamo options; the
    workers read the same values themselves, the flags only keep accelerate's view consistent.
    """
    extra = list(launcher.accelerate_extra_args)
    given = _flag_names(extra)
    machines = getattr(launcher, "num_machines", 1)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(launcher.num_processes), "--num_machines", str(machines),
    ]
    if machines > 1:
        command += ["--machine_rank", str(launcher.machine_rank), "--main_process_ip", str(launcher.main_process_ip)]
    command += ["--main_process_port", str(getattr(launcher, "main_process_port", None) or _free_port())]
    precision = (config.mixed_precision if config is not None else None) or "no"  # no config: full precision
    command += ["--mixed_precision", precision]
    command += ["--dynamo_backend", launcher.dynamo_backend or "no"]
    if launcher.dynamo_backend and config is not None:
        if config.dynamo_mode:
            command += ["--dynamo_mode", config.dynamo_mode]
        if config.dynamo_fullgraph:
            command.append("--dynamo_use_fullgraph")
        if config.dynamo_dynamic:
            command.append("--dynamo_use_dynamic")
        if config.dynamo_use_regional_compilation:
            command.append("--dynamo_use_regional_compilation")
    # With an accelerate config file on GPUs, its distributed_type (FSDP, DeepSpeed, ...) decides;
    # --multi_gpu would override it. On the CPU, --multi_gpu is what starts several processes at all.
    engine_chosen = bool(given & set(_ENGINE_FLAGS)) or ("--config_file" in given and has_gpu)
    if launcher.num_processes > 1 and not engine_chosen:
        command.append("--multi_gpu")
    env = {LAUNCHED_MARKER: "1"}
    if not has_gpu:
        if not _uses_deepspeed(config):  # it would switch DeepSpeed off; ZeRO runs on gloo itself (training/zero.py)
            env["ACCELERATE_USE_CPU"] = "1"
        # Without --cpu, accelerate gives every process OMP_NUM_THREADS (default 1) threads; share the cores.
        if "OMP_NUM_THREADS" not in os.environ and "--num_cpu_threads_per_process" not in given:
            local = max(1, launcher.num_processes // machines)
            command += ["--num_cpu_threads_per_process", str(max(1, usable_cpus() // local))]
    command += extra
    command += ["-m", "simpletuner.cli", "train", *argv]
    return command, env


def printable_command(command: Sequence[str], env: dict[str, str]) -> str:
    """The command as one shell line, environment assignments first (what a user can paste), with
    secret option values and webhook URLs redacted: the line is printed, the real command is not."""
    from simpletuner.options.secrets import redacted_argv

    return (" ".join(f"{key}={shlex.quote(value)}" for key, value in env.items()) + " "
            + shlex.join(redacted_argv(command)))


def relaunch_under_accelerate(launcher, argv: Sequence[str], config=None) -> int:
    """Run the training under ``accelerate launch`` and return its exit code.

    Ctrl-C reaches the workers directly (same process group); we wait for them to stop, so their
    output is not cut off, and return 130.
    """
    import torch

    command, extra_env = accelerate_command(launcher, argv, has_gpu=torch.cuda.is_available(), config=config)
    # on stderr with the workers' logs: stdout carries only output a command was asked for
    print(f"launch: {printable_command(command, extra_env)}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env={**os.environ, **extra_env})
    try:
        return process.wait()
    except KeyboardInterrupt:
        try:
            process.wait(timeout=120)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.terminate()
            process.wait()
        return 130
