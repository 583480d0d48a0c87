"""FSDP2 (torch's ``fully_shard``) through accelerate's FSDP plugin: the denoiser's weights, gradients
and optimizer state split across the processes.

accelerate does the sharding (``Accelerator.prepare``), the gradient reduction and the clipping; this
module only builds the plugin from the ``--fsdp_*`` options and handles what the trainer does with
whole weights: checkpoints and the final LoRA / pipeline. Those are gathered: every process takes part
in gathering the full weights and the full optimizer state, the main process writes them in the same
files as a single-process run, and a resume loads the weights before sharding and the optimizer state
after it. So a checkpoint of a sharded run resumes with any process count. With
``--fsdp_state_dict_type sharded`` nothing is gathered for a checkpoint: every process writes its own
slices with torch's distributed checkpoint (DCP) into ``checkpoint-<step>/sharded/`` and reads them
back on resume, which needs the same process count (the final LoRA / pipeline is still gathered).

On the CPU, accelerate 1.16 keeps the gloo processes as MULTI_CPU (DDP) and ignores the plugin
(its FSDP switch only exists for GPU-like backends), although torch's fully_shard runs on gloo (see
documentation/DISTRIBUTED.md, "What was proven on the CPU"). :func:`mark_fsdp_on_cpu` marks the
state FSDP after the Accelerator is built, so the same accelerate code shards, saves and reduces on
the CPU as on GPUs; this is what lets the tests compare a sharded run with one process.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)


def fsdp_plugin(config):
    """accelerate's FSDP plugin for ``--fsdp_enable``, or None. The block classes are filled in when the
    denoiser is known (:func:`set_block_classes`)."""
    if not config.fsdp_enable:
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=bool(config.fsdp_reshard_after_forward),
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=block_class_names_from_option(config),
        state_dict_type="FULL_STATE_DICT",
        # the main process's weights are sent to every shard (the others built the denoiser on meta: loads_weights)
        cpu_ram_efficient_loading=bool(config.fsdp_cpu_ram_efficient_loading),
    )


def loads_weights(config, is_main: bool) -> bool:
    """Whether this process reads the denoiser's weights from disk. With ``--fsdp_cpu_ram_efficient_loading``
    only the main process does; the others build it from its config on the meta device (no memory), and
    accelerate sends each of them its slices of the main process's weights when FSDP2 shards the model.
    So N processes on one machine hold one copy of the weights in CPU memory, not N."""
    return is_main or not (config.fsdp_enable and config.fsdp_cpu_ram_efficient_loading)


def parallelism_config(config):
    """HSDP's 2-D device mesh (replicas x shards) for accelerate, or None for plain FSDP2."""
    if not config.fsdp_enable or config.hsdp_replicate_dim is None:
        return None
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(dp_replicate_size=config.hsdp_replicate_dim, dp_shard_size=config.hsdp_shard_dim)


def accelerator_mesh(config):
    """The ``parallelism_config`` to hand ``Accelerator(...)``: the HSDP mesh on GPUs. On CPU processes
    accelerate 1.16 refuses a mesh at construction (it validates it against MULTI_CPU, before
    :func:`mark_fsdp_on_cpu` can make the state FSDP), so there it is attached afterwards instead."""
    return parallelism_config(config) if torch.cuda.is_available() else None


def block_class_names_from_option(config) -> list[str] | None:
    value = config.fsdp_transformer_layer_cls_to_wrap
    return [name.strip() for name in str(value).split(",") if name.strip()] if value else None


def mark_fsdp_on_cpu(accelerator, plugin, config=None) -> None:
    """Make accelerate's state FSDP on gloo CPU processes (see the module docstring), with HSDP's mesh
    when ``config`` asks for one; no-op elsewhere."""
    if plugin is None:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if state.mixed_precision != "no":  # as accelerate does for FSDP on GPUs: compute in bf16 / fp16, keep fp32 weights
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    mesh = parallelism_config(config) if config is not None else None
    if mesh is not None:  # what Accelerator(parallelism_config=...) does on GPUs, once the state is FSDP
        state.parallelism_config = mesh
        state.device_mesh = mesh.get_device_mesh("cpu")
        mesh._validate_accelerator(accelerator)
        logger.info("HSDP on %d CPU processes (gloo): %d replicas x %d shards", accelerator.num_processes,
                    config.hsdp_replicate_dim, config.hsdp_shard_dim)
        return
    logger.info("FSDP2 on %d CPU processes (gloo)", accelerator.num_processes)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def check_started(accelerator, plugin) -> None:
    """--fsdp_enable needs several processes: one process has nothing to shard across."""
    if plugin is None:
        return
    from simpletuner.options import ConfigError

    if accelerator.num_processes < 2:
        raise ConfigError("`--fsdp_enable` shards the weights across processes, but this run has one process. Set "
                          "TRAINING_NUM_PROCESSES=2 or more in config/config.env (or `--num_processes`), or remove "
                          "`--fsdp_enable`")
    if not is_fsdp(accelerator):
        raise ConfigError(f"`--fsdp_enable`: accelerate chose {accelerator.distributed_type} instead of FSDP; remove "
                          "engine flags (--multi_gpu, --use_deepspeed) from ACCELERATE_EXTRA_ARGS")


def set_block_classes(accelerator, denoiser: torch.nn.Module) -> list[str]:
    """Shard each repeated block of the denoiser as one unit unless the option named the classes.

    A block's weights are then gathered just before it runs and freed after it (the memory saving of
    FSDP); everything outside the blocks goes into the root unit."""
    from simpletuner.training.distributed import repeated_blocks

    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap:
        return list(plugin.transformer_cls_names_to_wrap)
    names = sorted({type(block).__name__ for block in repeated_blocks(denoiser)})
    if not names:
        logger.warning("FSDP2: %s has no repeated blocks; the whole denoiser is one unit (gathered at once)",
                       type(denoiser).__name__)
    plugin.transformer_cls_names_to_wrap = names
    logger.info("FSDP2 shards these block classes as units: %s", ", ".join(names) or "(none)")
    return names


def trained_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The sharded module's trained parameters: fully_shard replaces every parameter object, so lists taken
    before ``prepare`` point at the old, unsharded ones."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def local_tensors(parameters) -> list[torch.Tensor]:
    """This process's slices (for checks that must not start a collective on one process alone)."""
    from torch.distributed.tensor import DTensor

    return [p.to_local() if isinstance(p, DTensor) else p for p in parameters]


@contextlib.contextmanager
def gathered_weights(module: torch.nn.Module, is_main: bool) -> Iterator[None]:
    """Inside, on the main process: the module's parameters are the full weights (plain tensors), so the
    usual saving code (peft, safetensors, diffusers) writes exactly what one process would. Every process
    must enter: the gathering is collective.

    FSDP2 turns the module back into its slices before every ``state_dict()`` (a pre-save hook), so
    gathering in place with ``unshard()`` is undone by the first save. The full state dict is gathered
    instead (onto the main process, in CPU memory), and the slices are put back on the way out.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        yield
        return
    device = next(module.parameters()).device
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for name, tensor in full.items():
            owner_name, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            sharded = owner._parameters.get(attribute)
            if sharded is None:  # a buffer: FSDP2 leaves buffers whole
                continue
            # a copy with its own storage: gathered tensors can be views of one buffer, which safetensors refuses
            whole = tensor.detach().to(device).clone()
            owner._parameters[attribute] = torch.nn.Parameter(whole, requires_grad=sharded.requires_grad)
            swapped.append((owner, attribute, sharded))
        yield
    finally:
        for owner, attribute, sharded in reversed(swapped):
            owner._parameters[attribute] = sharded


def full_optimizer_state(module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter names, on the main process (empty elsewhere).
    Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Give every process its slice of a gathered optimizer state (every process calls it with the file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class ShardedSaving:
    """What a sharded run gathers before the main process writes a checkpoint or the final weights.

    ``gathered()`` is entered by every process; inside it the optimizer state (gathered first, while the
    weights are still sharded) is available as :meth:`optimizer_state` for the checkpoint's optimizer.pt.
    """

    def __init__(self, module: torch.nn.Module, optimizer, is_main: bool, shards: bool = False,
                 wait_for_everyone=None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.is_main = is_main
        #: --fsdp_state_dict_type sharded: checkpoints hold each process's slices (DCP), not gathered files
        self.shards = shards
        self.wait_for_everyone = wait_for_everyone
        self._optimizer_state: dict[str, Any] | None = None

    @contextlib.contextmanager
    def for_checkpoint(self, output_dir: Path, step: int) -> Iterator[None]:
        """Entered by every process around a checkpoint save. Gathered checkpoints gather; sharded ones
        write every process's shards into :func:`shard_staging_folder` first, and inside, the main process
        moves them into the checkpoint (:meth:`shard_writers`). Shards left behind by a failed save are
        removed on the way out."""
        if not self.shards:
            with self.gathered(with_optimizer=True):
                yield
            return
        import torch.distributed.checkpoint as dcp

        staging = shard_staging_folder(output_dir, step)
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # from a save of this step that was killed
        self.wait_for_everyone()
        dcp.save(sharded_state(self.module, self.optimizer), checkpoint_id=str(staging))
        self.wait_for_everyone()  # every process's shard and the metadata are on disk
        try:
            yield
        finally:
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)

    def shard_writers(self, output_dir: Path, step: int) -> dict[str, Any]:
        """The checkpoint writer's entry for the shards: move the staged folder in (the manifest written
        after it then lists every shard file)."""
        staging = shard_staging_folder(output_dir, step)
        return {SHARDED_FOLDER: lambda path: shutil.move(str(staging), str(path))}

    def restore_shards(self, checkpoint: Path) -> None:
        """Every process reads its slices of the weights and optimizer state back (collective)."""
        load_sharded_state(self.module, self.optimizer, checkpoint / SHARDED_FOLDER)

    @contextlib.contextmanager
    def gathered(self, with_optimizer: bool) -> Iterator[None]:
        if with_optimizer:
            self._optimizer_state = full_optimizer_state(self.module, self.optimizer)
        try:
            with gathered_weights(self.module, self.is_main):
                yield
        finally:
            self._optimizer_state = None

    def optimizer_state(self) -> dict[str, Any]:
        if self._optimizer_state is None:
            raise RuntimeError("the sharded optimizer state is only available inside ShardedSaving.gathered()")
        return self._optimizer_state

    def restore_optimizer(self, state: dict[str, Any]) -> None:
        if any(not isinstance(key, str) for key in state.get("state", {})):
            from simpletuner.training.checkpoint import CheckpointError

            raise CheckpointError("this checkpoint's optimizer.pt was written without `--fsdp_enable` (its state is "
                                  "keyed by parameter position, a sharded run's by parameter name); resume it without "
                                  "`--fsdp_enable`, or start a new --output_dir")
        load_full_optimizer_state(self.module, self.optimizer, state)


# --- --fsdp_state_dict_type sharded: checkpoints written by every process with torch DCP -----------------

#: Folder inside ``checkpoint-<step>`` holding the DCP files (one ``.distcp`` per process and ``.metadata``).
SHARDED_FOLDER = "sharded"


def writes_shards(config) -> bool:
    """True when checkpoints hold each process's slices instead of the gathered weights."""
    return bool(config.fsdp_enable) and config.fsdp_state_dict_type == "sharded"


def shard_staging_folder(output_dir: Path, step: int) -> Path:
    """Where every process writes its shards before the main process moves them into the checkpoint.

    The name starts like the checkpoint writer's own temporary folders, so the shards of a save killed
    half-way are removed at the next start like any other half-written checkpoint, and are never
    resumed from: only the checkpoint's manifest (written last, listing the shard files) makes them part
    of one."""
    from simpletuner.training.checkpoint import TEMP_PREFIX

    return output_dir / f"{TEMP_PREFIX}{step}-{SHARDED_FOLDER}"


def _trained_names(module: torch.nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def sharded_state(module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """This process's slices of the trained weights and their optimizer state, keyed by parameter names
    (DCP's layout). Frozen weights are left out: they come back from the base model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trained = _trained_names(module)
    weights = {name: tensor for name, tensor in get_model_state_dict(module).items() if name in trained}
    return {"model": weights, "optimizer": get_optimizer_state_dict(module, _inner(optimizer))}


def load_sharded_state(module: torch.nn.Module, optimizer, folder: Path) -> None:
    """Read a sharded checkpoint back into the sharded module and optimizer. Collective: every process
    calls it. The template from :func:`sharded_state` tells DCP which slice each process wants."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = sharded_state(module, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(module, _inner(optimizer), state["optimizer"])


def check_sharded_resume(folder: Path, state: dict[str, Any], sharded_run: bool, num_processes: int) -> None:
    """A sharded checkpoint resumes only as a sharded run with the process count that wrote it, and a
    gathered one only without ``--fsdp_state_dict_type sharded``: each holds what the other lacks."""
    from simpletuner.training.checkpoint import PerProcessState

    PerProcessState(
        folder=SHARDED_FOLDER, written="written with `--fsdp_state_dict_type sharded`",
        holds=f"its weights and optimizer state are only in {SHARDED_FOLDER}/ (torch DCP shards)", parts="shards",
        resume_with="`--fsdp_enable true --fsdp_state_dict_type sharded`",
        any_count="or use `--fsdp_state_dict_type full` for checkpoints that resume with any count",
        without=f"was written gathered (no {SHARDED_FOLDER}/ folder), and this run uses `--fsdp_state_dict_type "
                "sharded`; resume it with `--fsdp_state_dict_type full`",
    ).check_resume(folder, state, sharded_run, num_processes)
