"""What the trainer does differently with several processes, and torch.compile of the denoiser.

The rule that keeps multi-process training simple and exact: every process walks the same seeded
global batch order and takes every N-th batch (``Trainer._next_local_batch``), and the randomness of
a batch (noise, timesteps, caption dropout, dropout) is seeded by the batch's index in that global
order, not by the process that happens to train it. So N processes with gradient accumulation A
compute the same update as one process with accumulation N x A (up to float summation order), the
processes never draw the same noise, and a checkpoint can be resumed with another process count as
long as the global batch stays the same.
"""

from __future__ import annotations

import hashlib
import io
import os
import logging
import sys
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

#: training_state.json keys describing how many images one optimizer step consumed.
TOPOLOGY_KEYS = ("num_processes", "train_batch_size", "gradient_accumulation_steps")


# --- per-batch randomness ---------------------------------------------------------------------------

def seed_base(seed: int | None) -> int:
    """The base of every batch seed: ``--seed``, or torch's start-up seed when there is none."""
    return int(seed) if seed is not None else int(torch.initial_seed())


def batch_seed(base: int, index: int) -> int:
    """A 63-bit seed for global batch ``index``; neighbouring indices give unrelated seeds."""
    digest = hashlib.sha256(f"simpletuner-batch:{base}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_batch(base: int, index: int) -> None:
    """Seed python, numpy and torch (all devices) for the batch at ``index`` of the global order.

    The same three calls as accelerate's ``set_seed``, without its per-call probing of optional
    backends, which cost about 1.3 ms a step (2 % of a tiny model's step)."""
    import random

    import numpy

    seed = batch_seed(base, index) % 2**32
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator, CUDA's included


# --- cross-process bookkeeping ------------------------------------------------------------------------

def mean_over_processes(accelerator, value: float) -> float:
    """The mean of a per-process number over all processes (the loss of the whole global batch)."""
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="mean").item())


def weights_digest(parameters: Iterable[torch.Tensor]) -> str:
    """sha256 of the trained parameters' bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for parameter in parameters:
        digest.update(parameter.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_rank_sync(accelerator, step: int, local_loss: float, parameters: list[torch.Tensor]) -> str:
    """Print this process's weight digest after ``step`` (on stderr, with the logs) and stop the run if
    processes disagree.

    Enabled by SIMPLETUNER_CHECK_RANK_SYNC=1; costs one pass over the trained weights per step.
    """
    from accelerate.utils import gather_object

    digest = weights_digest(parameters)
    # One system call per line: the processes share one pipe, and a single write of under PIPE_BUF
    # bytes is never interleaved with another process's output (print() may take several).
    line = f"rank-sync step={step} rank={accelerator.process_index} loss={local_loss!r} weights={digest}\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (OSError, ValueError, io.UnsupportedOperation):  # a captured stream without a descriptor
        sys.stderr.write(line)
    if accelerator.num_processes > 1:
        digests = gather_object([digest])
        if len(set(digests)) > 1:
            raise RuntimeError(f"processes hold different weights after step {step}: {digests} (by rank)")
    return digest


def ddp_ignored_names(module: torch.nn.Module) -> list[str]:
    """The parameter and buffer names DDP will leave alone when it wraps ``module``."""
    return list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))


def hide_from_ddp(module: torch.nn.Module, names: Iterable[str]) -> None:
    """Have DDP ignore ``names`` (parameters or buffers of ``module``) when it wraps ``module``.

    For frozen weights kept off the accelerator (block swap, RamTorch): DDP refuses a module whose
    parameters sit on more than one device type, frozen ones included, and broadcasts every parameter
    and buffer from rank 0 at start-up and buffers before each forward. Ignored tensors skip all three;
    frozen weights need none of it (no gradient to reduce, loaded identically on every process).
    Must run before ``accelerator.prepare`` wraps the module; names already hidden are kept."""
    names = set(names)
    if not names:
        return
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, sorted(names | set(ddp_ignored_names(module))))


# --- checkpoints and process counts ---------------------------------------------------------------------

def topology(config, num_processes: int) -> dict[str, int]:
    """What training_state.json records about the shape of a step."""
    return {"num_processes": num_processes, "train_batch_size": config.train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps}


def check_resume_topology(folder, state: dict[str, Any], config, num_processes: int) -> None:
    """Allow a resume with another process count only when the global batch is unchanged.

    The data order and every batch's noise are global (see the module docstring), so resuming
    2 processes x accumulation 1 as 1 process x accumulation 2 continues the same training. Any other
    change of the process count would change the images per step under the optimizer and LR
    schedule, so it stops with the settings that would work.
    """
    from simpletuner.training.checkpoint import CheckpointError

    saved = {key: state.get(key) for key in TOPOLOGY_KEYS}
    if saved["num_processes"] is None:
        logger.warning("%s does not record its process count (written by an older version); resuming with %d",
                       folder, num_processes)
        return
    if saved["num_processes"] == num_processes:
        return
    now = topology(config, num_processes)
    images_then = saved["num_processes"] * saved["train_batch_size"] * saved["gradient_accumulation_steps"]
    images_now = num_processes * now["train_batch_size"] * now["gradient_accumulation_steps"]
    if saved["train_batch_size"] == now["train_batch_size"] and images_then == images_now:
        logger.info("resuming a %d-process checkpoint with %d processes: the global batch is unchanged "
                    "(%d images per step), so training continues exactly", saved["num_processes"],
                    num_processes, images_now)
        return
    fix = [f"TRAINING_NUM_PROCESSES={saved['num_processes']}"]
    per_step = saved["num_processes"] * saved["gradient_accumulation_steps"]
    if saved["train_batch_size"] == now["train_batch_size"] and per_step % num_processes == 0:
        fix.append(f"--gradient_accumulation_steps {per_step // num_processes} (keeps {images_then} images per step "
                   f"with {num_processes} process(es))")
    raise CheckpointError(
        f"{folder} was trained with {saved['num_processes']} process(es) x batch {saved['train_batch_size']} x "
        f"accumulation {saved['gradient_accumulation_steps']} = {images_then} images per step; this run has "
        f"{num_processes} x {now['train_batch_size']} x {now['gradient_accumulation_steps']} = {images_now}. "
        f"Resume with {' or '.join(fix)}, or start a new --output_dir"
    )


# --- torch.compile ------------------------------------------------------------------------------------

def _is_repeated_blocks(module: torch.nn.Module) -> bool:
    """A ModuleList whose children all share one class (transformer blocks, resnets, ...)."""
    return (isinstance(module, torch.nn.ModuleList) and len(module) > 0
            and all(type(child) is type(module[0]) for child in module))


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost repeated blocks of ``module``, in order (what regional compilation compiles)."""
    found: list[torch.nn.Module] = []
    for child in module.children():
        if _is_repeated_blocks(child):
            found.extend(child)
        else:
            found.extend(repeated_blocks(child))
    return found


def compile_denoiser(module: torch.nn.Module, backend: str | None, config) -> int:
    """Compile ``module`` in place with ``backend`` and the ``--dynamo_*`` options; returns how many
    modules were compiled (0 without a backend).

    ``nn.Module.compile`` keeps the module object and its parameter names, so checkpoints, LoRA
    files and EMA see the same weights as without compilation (accelerate's own regional
    compilation renames them). With ``--dynamo_use_regional_compilation`` only the repeated blocks
    are compiled: blocks of one class share the compiled code, so deep models compile in a
    fraction of the time and the rest runs eagerly.
    """
    if not backend:
        return 0
    kwargs: dict[str, Any] = {"backend": backend, "fullgraph": bool(config.dynamo_fullgraph),
                              "dynamic": config.dynamo_dynamic}
    if config.dynamo_mode:
        kwargs["mode"] = config.dynamo_mode
    targets = repeated_blocks(module) if config.dynamo_use_regional_compilation else [module]
    if config.dynamo_use_regional_compilation and config.dynamo_dynamic is None:
        # Blocks of one class with different sizes (a UNet's levels) make torch switch to dynamic
        # shapes on the second size, which inductor (torch 2.13) fails to compile for diffusers'
        # attention blocks; static shapes compile once per size instead.
        kwargs["dynamic"] = False
    if not targets:
        logger.warning("--dynamo_use_regional_compilation: %s has no repeated blocks; compiling it whole",
                       type(module).__name__)
        targets = [module]
    for target in targets:
        target.compile(**kwargs)
    logger.info("torch.compile (%s%s): %d module(s) of %s", backend,
                ", regional" if targets[0] is not module else "", len(targets), type(module).__name__)
    return len(targets)


def unwrap_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (or another accelerate wrapper): validation runs it on the main process
    only, and DDP's own forward would wait for the other processes."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)


# --- engines whose state simpletuner cannot save yet ------------------------------------------------------

def check_engine(accelerator, zero_from_options: bool = False) -> None:
    """Stop before training when accelerate would shard the weights or the optimizer state in a way
    simpletuner cannot save.

    Checkpoints and final weights are written by the main process from its own copy of the model. That
    is complete under DDP, FSDP with NO_SHARD and DeepSpeed ZeRO stage 0, where every process holds
    everything; under FSDP2, whose weights and optimizer state are gathered first (training/fsdp.py);
    and under ZeRO stages 1 and 2 started from ``--zero_stage`` / ``--deepspeed_config``, whose split
    optimizer state every process writes itself (training/zero.py). ZeRO set up by hand in accelerate
    bypasses the options that make this safe (batch size, clipping, stage checks), so it is refused.
    """
    from accelerate.utils import DistributedType

    from simpletuner.options import ConfigError

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage and not zero_from_options:
            raise ConfigError(
                f"DeepSpeed ZeRO stage {stage} was set up in accelerate (--use_deepspeed in ACCELERATE_EXTRA_ARGS or an "
                "accelerate config file); simpletuner only trains ZeRO it configured itself, which saves the split "
                f"state correctly. Remove --use_deepspeed and set `--zero_stage {stage}` (and `--deepspeed_config` for "
                "offloading) instead"
            )
    elif kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        strategy = plugin.sharding_strategy if plugin.sharding_strategy is not None else plugin.reshard_after_forward
        name = getattr(strategy, "name", str(strategy))
        version = getattr(plugin, "fsdp_version", 1)
        if version == 1 and name != "NO_SHARD":
            raise ConfigError(
                f"FSDP version 1 ({name}) flattens the weights into shards that simpletuner cannot save. Use "
                "`--fsdp_enable true` (FSDP2, gathered checkpoints) instead of --use_fsdp in ACCELERATE_EXTRA_ARGS / "
                "the accelerate config, or fsdp_sharding_strategy NO_SHARD"
            )


def broadcast_parameters(accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """Give every process the main process's values of ``parameters`` (modules a method or regularizer
    creates after the model, e.g. a projector: with ``--seed_for_each_device`` each process would
    otherwise initialise its own)."""
    if accelerator.num_processes == 1 or not parameters:
        return
    from accelerate.utils import broadcast

    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(broadcast(parameter.detach().clone(), from_process=0))


def average_gradients(accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters outside the DDP-wrapped denoiser over processes, as DDP does
    for its own. A parameter that got no gradient on a process counts as zero there."""
    if accelerator.num_processes == 1 or not parameters:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        parameter.grad.copy_(accelerator.reduce(parameter.grad, reduction="mean"))
