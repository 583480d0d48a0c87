"""DeepSpeed ZeRO at run time: starting the engine's processes, and checkpoints of its split state.

``training/deepspeed.py`` turns the options into the DeepSpeed config; this module does what the
trainer needs once the engine runs. accelerate wraps the denoiser and the optimizer in DeepSpeed's
engine (``Accelerator.prepare``); ``accelerator.backward`` then runs the engine's backward and, at the
end of each accumulation window, its optimizer step with DeepSpeed's clipping, so the trainer's own
``optimizer.step()`` / ``zero_grad()`` pass through to no-ops.

What changes for checkpoints. Under ZeRO stages 1 and 2 every process still holds the whole weights
(the LoRA / full weights files are written by the main process as in any run), but the optimizer state
(Adam's moments and the fp32 master weights) is split: each process holds the share for its slice of
the flattened parameters. So ``optimizer.pt`` is replaced by DeepSpeed's own checkpoint, written by
every process into ``checkpoint-<step>/zero/`` (one optimizer file per process) and read back by every
process on resume, which therefore needs the process count that wrote it. Stage 3 splits the weights
too: every process gathers the weights the main process is about to write (the trained ones for a
LoRA, all of them for a full fine-tune) for the length of the save, and a resume takes each process's
slice of the weights from DeepSpeed's files instead of the weights file.

On CPU processes (gloo) DeepSpeed 0.19 runs too, through its CPU accelerator: accelerate only needs to
be told the backend (it finds none for the CPU on its own and would treat the run as one process), and
the launcher must not mark the run as CPU-only (that switches DeepSpeed off). This is what lets the
tests compare 2 ZeRO processes with one plain process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

#: The folder of a checkpoint holding DeepSpeed's own files (its split optimizer state).
ZERO_FOLDER = "zero"
#: DeepSpeed files a checkpoint under a tag (a sub-folder); ours is always the same, the step is in the path.
TAG = "state"


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def accelerator_arguments(config) -> dict[str, Any]:
    """``Accelerator(...)`` arguments for ``--zero_stage`` / ``--deepspeed_config``: the plugin, and
    gloo as the process-group backend where there is no GPU (accelerate picks none for the CPU)."""
    import torch

    from simpletuner.training.deepspeed import deepspeed_plugin, uses_deepspeed

    if not torch.cuda.is_available():
        # Where deepspeed is installed, accelerate imports it in every run (to recognise its engine when
        # unwrapping a model), and deepspeed then prints a warning on stdout that it found no GPU. Naming
        # the CPU up front is the same choice without the noise.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not uses_deepspeed(config):
        return {"deepspeed_plugin": None}
    from accelerate.utils import InitProcessGroupKwargs

    _single_process_environment()
    arguments: dict[str, Any] = {"deepspeed_plugin": deepspeed_plugin(config)}
    if not torch.cuda.is_available():
        arguments["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return arguments


def load_models_whole(accelerator) -> None:
    """Under stage 3 accelerate registers its DeepSpeed config with transformers, whose ``from_pretrained``
    then splits every model it loads across the processes as it loads (DeepSpeed's ``zero.Init``).
    Only the denoiser should be split, by the engine when it is prepared: the frozen text encoders are
    run by one process at a time (caching, validation) and must stay whole, so the registration is
    withdrawn before anything loads."""
    if not is_deepspeed(accelerator) or accelerator.state.deepspeed_plugin.zero_stage != 3:
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _single_process_environment() -> None:
    """Let one process (ZeRO-Offload on one GPU) start DeepSpeed without a launcher: the engine always
    builds a process group, and accelerate only builds one when a launcher set LOCAL_RANK."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def check_outside_parameters(accelerator, parameters: list) -> None:
    """A method or regularizer with trainable modules outside the denoiser (a projector, a critic)
    cannot train under ZeRO: DeepSpeed's engine owns one model, and the optimizer it splits holds only
    that model's parameters."""
    if not is_deepspeed(accelerator) or not parameters:
        return
    from simpletuner.options import ConfigError

    raise ConfigError(f"DeepSpeed ZeRO (`--zero_stage` / `--deepspeed_config`) trains the denoiser only, but this run's "
                      f"method or regularizer adds {len(parameters)} trainable tensor(s) of its own (e.g. CREPA's or "
                      "U-REPA's projector): DeepSpeed's engine owns one model, and its split optimizer would leave "
                      "them out. Turn that regularizer off, or train without ZeRO (plain multi-GPU or `--fsdp_enable`)")


def staging_folder(output_dir: Path, step: int) -> Path:
    """Where every process writes its DeepSpeed files before the main process moves them into the
    checkpoint. Named like the checkpoint writer's temporary folders, so a save killed half-way is
    removed at the next start and never resumed from."""
    from simpletuner.training.checkpoint import TEMP_PREFIX

    return output_dir / f"{TEMP_PREFIX}{step}-{ZERO_FOLDER}"


class ZeroCheckpoints:
    """DeepSpeed's split optimizer state in and out of simpletuner checkpoints (see the module docstring)."""

    def __init__(self, engine, is_main: bool, wait_for_everyone: Callable[[], None], lora: bool, stage: int) -> None:
        self.engine = engine
        self.is_main = is_main
        self.wait_for_everyone = wait_for_everyone
        self.lora = lora
        self.stage = stage

    @property
    def splits_weights(self) -> bool:
        """Stage 3: each process holds a slice of every weight; its whole value exists only when gathered."""
        return self.stage >= 3

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Entered by every process: under stage 3 the weights the main process writes (the trained ones
        for a LoRA, all of them for a full fine-tune) are whole inside; nothing to do below stage 3."""
        if not self.splits_weights:
            yield
            return
        import deepspeed

        module = self.engine.module
        wanted = [p for p in module.parameters() if p.requires_grad] if self.lora else list(module.parameters())
        with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None):  # read-only: nothing is scattered back
            yield

    @contextlib.contextmanager
    def for_checkpoint(self, output_dir: Path, step: int) -> Iterator[None]:
        """Entered by every process around a checkpoint save: each writes its share of the optimizer
        state into the staging folder, then the main process writes the checkpoint (whose writer moves
        the staged files in, :meth:`writers`). A staging folder left by a failed save is removed."""
        staging = staging_folder(output_dir, step)
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # from a save of this step that was killed
        self.wait_for_everyone()
        # A LoRA run leaves the frozen base out: it comes back from the base model, not from the checkpoint.
        self.engine.save_checkpoint(str(staging), tag=TAG, client_state={}, save_latest=False,
                                    exclude_frozen_parameters=self.lora)
        self.wait_for_everyone()  # every process's optimizer file is on disk
        try:
            with self.gathered():  # stage 3: the weights files are written from whole weights
                yield
        finally:
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def writers(output_dir: Path, step: int) -> dict[str, Callable[[Path], Any]]:
        """The checkpoint writer's entry for DeepSpeed's files: move the staged folder in (the manifest,
        written after it, then lists every file)."""
        staging = staging_folder(output_dir, step)
        return {ZERO_FOLDER: lambda path: shutil.move(str(staging), str(path))}

    def restore(self, checkpoint: Path) -> None:
        """Every process reads its share of the optimizer state (and the fp32 master weights) back.

        Below stage 3 this follows the loading of the trained weights from the checkpoint's own files;
        DeepSpeed then copies its fp32 masters over them, which is what the run would have continued
        from. Under stage 3 DeepSpeed's files are the only source of each process's weight slice."""
        self.engine.load_checkpoint(str(checkpoint / ZERO_FOLDER), tag=TAG, load_module_strict=not self.lora,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


def check_resume(folder: Path, state: dict[str, Any], zero_run: bool, num_processes: int) -> None:
    """A ZeRO checkpoint resumes only under ZeRO with the process count that wrote it (each process
    reads its own share of the optimizer state), and a checkpoint without ZeRO state only without ZeRO."""
    from simpletuner.training.checkpoint import PerProcessState

    PerProcessState(
        folder=ZERO_FOLDER, written="written under DeepSpeed ZeRO",
        holds=f"its optimizer state is split in {ZERO_FOLDER}/ (one file per process)",
        parts="ZeRO optimizer state", resume_with="the same `--zero_stage`", any_count="or start a new --output_dir",
        without=f"was written without DeepSpeed ZeRO (its optimizer state is in optimizer.pt, not split in "
                f"{ZERO_FOLDER}/); resume it without `--zero_stage` / `--deepspeed_config`",
    ).check_resume(folder, state, zero_run, num_processes)
