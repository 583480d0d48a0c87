"""Where the model's weights and activations live during a run: the memory options in one place.

The trainer calls :class:`MemorySavers` at five moments, and everything else happens here:

- ``load_device``: the device a family loads onto. Options that keep weights off the accelerator
  (block swap, RamTorch, component offload, group offload) load on the CPU and place afterwards,
  so a model that does not fit on the accelerator never has to be there whole.
- ``after_load``: placement (text encoders, VAE, the denoiser minus the blocks that will be
  swapped), VAE slicing/tiling, component offload (``--enable_model_cpu_offload``) or diffusers
  group offloading (``--enable_group_offload``) of the frozen components, and
  ``--delete_model_after_load`` for the denoiser's files.
- ``startup()``: while the caches are built, ``--offload_during_startup`` keeps the VAE off the
  accelerator while captions are encoded and the text encoders off it while latents are encoded;
  at the end the text encoders' hub files go with ``--delete_model_after_load``.
- ``before_optimization``: after the adapter is attached and checkpointing enabled, before the
  optimizer and ``accelerator.prepare``: the unsloth checkpointing backend, block swap, RamTorch.
- ``saving()``: ``--offload_during_save`` moves what is being written to the CPU for the write.

Every move goes through :class:`Placement`, which records it; on a CPU-only machine all devices
are the CPU and a move changes nothing, so tests read that record (and the storage identity of
swapped weights, see :mod:`simpletuner.models.block_swap`) to see what a GPU run would do.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

#: Methods through which a VAE is used (pipelines call encode/decode, not forward).
VAE_ENTRY_POINTS = ("encode", "decode", "forward")


# --- placement -------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Moves components between the compute device and the CPU and remembers each move as
    ``(component, "compute" | "offload", why)``: by role, because on a CPU-only run both are the CPU."""

    compute_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    history: list[tuple[str, str, str]] = field(default_factory=list)

    def move(self, name: str, module: torch.nn.Module | None, role: str, reason: str) -> None:
        if module is None:
            return
        module.to(self.compute_device if role == "compute" else self.offload_device)
        self.record(name, role, reason)

    def record(self, name: str, role: str, reason: str) -> None:
        self.history.append((name, role, reason))
        logger.debug("%s -> %s (%s)", name, role, reason)

    def moves_of(self, name: str) -> list[tuple[str, str]]:
        return [(role, reason) for component, role, reason in self.history if component == name]


def text_encoders_of(model) -> dict[str, torch.nn.Module]:
    """The family's loaded text encoders, by pipeline component name (``text_encoder``, ``text_encoder_2`` ...)."""
    if hasattr(model, "text_encoder_modules"):
        return dict(model.text_encoder_modules())
    return {name: module for name, module in vars(model).items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)}


def vae_of(model) -> torch.nn.Module | None:
    vae = getattr(model, "vae", None)
    return vae if isinstance(vae, torch.nn.Module) else None


# --- unsloth-style checkpointing: the checkpointed inputs wait on the CPU --------------------------


class CpuActivationOffload:
    """A saved-tensors hook that parks saved activations in (pinned) CPU memory, copied on a side
    CUDA stream so the copy overlaps the forward pass, and brings them back for the backward pass.

    Wrapped around each gradient-checkpointed block call, the only tensors autograd saves there are
    the block's inputs (everything inside is recomputed), so this is the "unsloth" backend: the
    block inputs, which checkpointing still keeps on the accelerator, move to the CPU instead.
    Weights (tensors sharing storage with a parameter or buffer of ``root``) are never copied.

    ``force_copy`` copies even tensors that are on the CPU already; a CPU-only test uses it to run
    the pack/unpack path and check that gradients are unchanged. It cannot show the memory saving,
    which needs the activations to start on an accelerator.
    """

    def __init__(self, root: torch.nn.Module, min_bytes: int = 1024, force_copy: bool = False):
        self.root = root
        self.min_bytes = min_bytes
        self.force_copy = force_copy
        self.packed_count = 0
        self.packed_bytes = 0
        self._weights: set[int] = set()
        self._stream = None
        root.register_forward_pre_hook(self._refresh_weights)

    def _refresh_weights(self, module, args) -> None:
        tensors = list(self.root.parameters()) + list(self.root.buffers())
        self._weights = {t.untyped_storage().data_ptr() for t in tensors}

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        on_accelerator = tensor.device.type == "cuda"
        if size < self.min_bytes or not (on_accelerator or self.force_copy) or tensor.layout != torch.strided:
            return tensor
        if tensor.untyped_storage().data_ptr() in self._weights:
            return tensor
        self.packed_count += 1
        self.packed_bytes += size
        if not on_accelerator:
            return ("host", tensor.device, tensor.detach().clone(), None)
        stream = self._side_stream(tensor.device)
        host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(stream)  # the allocator must not reuse its memory before the copy ends
        event = stream.record_event()
        return ("host", tensor.device, host, event)

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        _, device, host, event = packed
        if event is None:
            return host.to(device, copy=True)
        torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def wrap(self, checkpoint_function: Callable) -> Callable:
        def offloaded(block, *args, **kwargs):
            with self.hooks():
                return checkpoint_function(block, *args, **kwargs)
        offloaded.__wrapped__ = checkpoint_function
        return offloaded


def offload_checkpointed_inputs(denoiser: torch.nn.Module, force_copy: bool = False) -> CpuActivationOffload:
    """Wrap every checkpointing function the family installed (diffusers keeps one per module that
    has a ``gradient_checkpointing`` flag) so the checkpointed inputs wait on the CPU."""
    offload = CpuActivationOffload(denoiser, force_copy=force_copy)
    wrapped = 0
    for module in denoiser.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is not None and not hasattr(function, "__wrapped__"):
            module._gradient_checkpointing_func = offload.wrap(function)
            wrapped += 1
    if not wrapped:
        raise ValueError("--gradient_checkpointing_backend unsloth found no checkpointed module in the denoiser")
    return offload


# --- component offload (--enable_model_cpu_offload) -------------------------------------------------


def offload_between_uses(name: str, module: torch.nn.Module, placement: Placement,
                         methods: tuple[str, ...] = ("forward",)) -> None:
    """Keep ``module`` on the CPU and move it to the compute device only while one of ``methods`` runs
    (diffusers' model CPU offload, for components that never train)."""
    placement.move(name, module, "offload", "model cpu offload: waits on the CPU")
    depth = {"calls": 0}
    for method_name in methods:
        method = getattr(module, method_name, None)
        if method is None:
            continue

        def visiting(*args, _method=method, **kwargs):
            if depth["calls"] == 0:
                placement.move(name, module, "compute", "model cpu offload: in use")
            depth["calls"] += 1
            try:
                return _method(*args, **kwargs)
            finally:
                depth["calls"] -= 1
                if depth["calls"] == 0:
                    placement.move(name, module, "offload", "model cpu offload: done")

        setattr(module, method_name, visiting)


# --- hub files (--delete_model_after_load) ---------------------------------------------------------


def is_local_model(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def delete_hub_files(repo_id: str, subfolders: list[str], cache_dir: str | None = None) -> list[str]:
    """Delete the cached hub files of ``repo_id`` under ``subfolders`` (blobs and snapshot links);
    returns the deleted snapshot paths. A local folder, an uncached repo or a failing delete (a
    shared cache another node cleaned first) deletes nothing and raises nothing."""
    from pathlib import Path

    if is_local_model(repo_id):
        logger.info("--delete_model_after_load: %s is a local folder; it is never deleted", repo_id)
        return []
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(cache_dir)
    except Exception as error:  # no cache folder yet, unreadable cache
        logger.info("--delete_model_after_load: no hub cache to clean (%s)", error)
        return []
    deleted = []
    for repo in info.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        chosen, kept_blobs = [], set()
        for revision in repo.revisions:
            for file in revision.files:
                relative = Path(file.file_path).relative_to(revision.snapshot_path)
                if relative.parts and relative.parts[0] in subfolders:
                    chosen.append((relative, file))
                else:
                    kept_blobs.add(Path(file.blob_path))
        for relative, file in chosen:
            # blobs are content-addressed: one shared with a file that stays (an identical config) stays
            paths = [Path(file.file_path)] + ([] if Path(file.blob_path) in kept_blobs else [Path(file.blob_path)])
            for path in paths:
                try:
                    path.unlink()
                except OSError:
                    pass
            deleted.append(str(relative))
    if deleted:
        logger.info("--delete_model_after_load: deleted %d cached file(s) of %s (%s)", len(deleted), repo_id,
                    ", ".join(sorted(subfolders)))
    return deleted


# --- the trainer's entry points --------------------------------------------------------------------


def move_except(module: torch.nn.Module, device, keep: list[torch.nn.Module]) -> None:
    """``module.to(device)`` leaving the submodules in ``keep`` (and everything inside them) alone."""
    kept = {id(m) for m in keep}
    stack = [module]
    while stack:
        current = stack.pop()
        for param in current._parameters.values():
            if param is not None:
                param.data = param.data.to(device)
        for key, buffer in current._buffers.items():
            if buffer is not None:
                current._buffers[key] = buffer.to(device)
        stack.extend(child for child in current.children() if id(child) not in kept)


class MemorySavers:
    """The memory options of one run (see the module docstring for when each acts)."""

    #: Make block swap / RamTorch copy weights even when the compute device is the swap device, so a
    #: CPU-only test can see (by storage identity) where each weight is. Never set in a real run.
    copy_on_same_device = False

    def __init__(self, config, compute_device: torch.device, local_rank: int = 0, dataset_plan=None):
        self.config = config
        self.dataset_plan = dataset_plan  # the run's checked dataset list, for --memory_budget's estimate
        self.compute_device = torch.device(compute_device)
        self.local_rank = local_rank
        self.placement = Placement(self.compute_device)
        self.block_swapper = None
        self.ramtorch_swappers: list = []
        self.activation_offload: CpuActivationOffload | None = None
        self.notes: list[str] = []

    # --- which options are on ---------------------------------------------------------------------

    @property
    def swaps_blocks(self) -> bool:
        return bool(self.config.musubi_blocks_to_swap)

    @property
    def offloads_components(self) -> bool:
        return bool(self.config.enable_model_cpu_offload or self.config.enable_group_offload)

    def load_device(self) -> torch.device:
        """Where the family loads its components: the CPU when weights are placed piecewise."""
        if self.swaps_blocks or self.config.ramtorch or self.offloads_components:
            return torch.device("cpu")
        return self.compute_device

    # --- after load -------------------------------------------------------------------------------

    def after_load(self, model) -> None:
        config = self.config
        self._place(model)
        vae = vae_of(model)
        if vae is not None:
            if config.vae_enable_slicing:
                vae.use_slicing = True
            if config.vae_enable_tiling:
                vae.use_tiling = True
        if config.memory_budget and self.local_rank == 0:
            self._check_budget()
        if config.delete_model_after_load and self.local_rank == 0:
            keep_vae = not config.validation_disable
            folders = [model.denoiser_name] + ([] if keep_vae else ["vae"])
            delete_hub_files(model.model_path, folders)

    def _check_budget(self) -> None:
        """``--memory_budget``: say so at start-up when the planner expects the run not to fit."""
        from simpletuner.memory import planner
        from simpletuner.memory.units import format_size, parse_size

        try:
            inventory = planner.read_inventory(self.config)
        except (FileNotFoundError, OSError, ValueError) as error:
            logger.info("--memory_budget: no estimate (%s)", error)
            return
        from simpletuner.memory.sharding import plan_sharding

        settings = planner.PlanSettings.from_config(self.config, self.dataset_plan)
        estimate, budget = planner.estimate(inventory, settings), parse_size(self.config.memory_budget)
        sharded = plan_sharding(estimate, inventory, self.config)  # FSDP2 / ZeRO: each rank holds a share
        peak = sharded.training_peak if sharded is not None else estimate.peak
        where = " per rank" if sharded is not None else ""
        if peak <= budget:
            self.notes.append(f"estimated peak{where} {format_size(peak)} within --memory_budget {format_size(budget)}")
            return
        proposal = planner.propose(inventory, settings, budget, self.config) if sharded is None else None
        advice = f"; to fit: {proposal.flags()}" if proposal else "; nothing it tries fits" if sharded is None else ""
        logger.warning("the memory planner estimates a peak%s of %s, above --memory_budget %s%s", where,
                       format_size(peak), format_size(budget), advice)

    def _place(self, model) -> None:
        """Put each component where it lives during training (the family loaded on load_device())."""
        config = self.config
        device = self.compute_device
        moved = self.load_device() != device
        if moved:
            model.device = device
        vae = vae_of(model)
        frozen = {**text_encoders_of(model), **({"vae": vae} if vae is not None else {})}
        trained = set(model.trainable_text_encoders()) if config.train_text_encoder else set()
        for name, module in frozen.items():
            if name in trained or not self.offloads_components:
                if moved:
                    self.placement.move(name, module, "compute", "after load")
            elif config.enable_model_cpu_offload:
                methods = VAE_ENTRY_POINTS if name == "vae" else ("forward",)
                offload_between_uses(name, module, self.placement, methods)
            else:
                self._group_offload(name, module)
        if not (moved or self.swaps_blocks):
            return
        from simpletuner.models.base import on_meta_device

        if on_meta_device(model.denoiser):  # --fsdp_cpu_ram_efficient_loading: FSDP2 fills it on the device
            self.placement.record(model.denoiser_name, "compute", "after load (no weights yet: sent when sharded)")
            return
        keep = []
        if self.swaps_blocks:
            from simpletuner.models.block_swap import last_blocks

            keep = [block for _, block in last_blocks(model.transformer_blocks(), config.musubi_blocks_to_swap)]
        if keep:
            move_except(model.denoiser, device, keep)
        else:
            model.denoiser.to(device)
        where = f"after load, {len(keep)} swapped block(s) stay on {config.musubi_block_swap_device}"
        self.placement.record(model.denoiser_name, "compute", where if keep else "after load")

    def _group_offload(self, name: str, module: torch.nn.Module) -> None:
        from diffusers.hooks import apply_group_offloading

        config = self.config
        folder = None
        if config.group_offload_to_disk_path:
            from pathlib import Path

            folder = str(Path(config.group_offload_to_disk_path) / name)
        apply_group_offloading(
            module, onload_device=self.compute_device, offload_device=torch.device("cpu"),
            offload_type=config.group_offload_type,
            num_blocks_per_group=config.group_offload_blocks_per_group if config.group_offload_type == "block_level" else None,
            use_stream=bool(config.group_offload_use_stream) and self.compute_device.type == "cuda",
            offload_to_disk_path=folder,
        )
        self.placement.record(name, "offload", f"group offload ({config.group_offload_type}"
                              + (f", on disk in {folder})" if folder else ")"))

    # --- start-up caching -------------------------------------------------------------------------

    @contextlib.contextmanager
    def startup(self, model) -> Iterator[None]:
        """While the latent and text caches are built."""
        config = self.config
        patched = []
        if config.offload_during_startup:
            encoders, vae = text_encoders_of(model), vae_of(model)
            placement, phase = self.placement, {"now": None}

            def only(wanted: str):
                if phase["now"] == wanted:
                    return
                phase["now"] = wanted
                for name, module in encoders.items():
                    placement.move(name, module, "compute" if wanted == "text" else "offload", f"startup: {wanted} caching")
                placement.move("vae", vae, "compute" if wanted == "latent" else "offload", f"startup: {wanted} caching")

            for method_name, wanted in (("encode_images", "latent"), ("encode_prompts", "text")):
                method = getattr(model, method_name)

                def caching(*args, _method=method, _wanted=wanted, **kwargs):
                    only(_wanted)
                    return _method(*args, **kwargs)

                setattr(model, method_name, caching)
                patched.append(method_name)
        try:
            yield
        finally:
            for method_name in patched:
                delattr(model, method_name)
            if patched:
                for name, module in {**text_encoders_of(model), "vae": vae_of(model)}.items():
                    self.placement.move(name, module, "compute", "startup done")
        if config.delete_model_after_load and self.local_rank == 0 and not config.train_text_encoder \
                and config.validation_disable:
            delete_hub_files(model.model_path, sorted(text_encoders_of(model)))

    # --- after the adapter, before the optimizer --------------------------------------------------

    def before_optimization(self, model) -> None:
        config = self.config
        if config.gradient_checkpointing and config.gradient_checkpointing_backend == "unsloth":
            self.activation_offload = offload_checkpointed_inputs(model.denoiser, force_copy=self.copy_on_same_device)
            self.notes.append("gradient checkpointing: block inputs wait on the CPU (unsloth backend)")
        if self.swaps_blocks:
            from simpletuner.models.block_swap import install_block_swap

            self.block_swapper = install_block_swap(model, config.musubi_blocks_to_swap, self.compute_device,
                                                    config.musubi_block_swap_device,
                                                    copy_on_same_device=self.copy_on_same_device)
            self.notes.append(f"block swap: {config.musubi_blocks_to_swap} blocks "
                              f"({self.block_swapper.swapped_bytes / 2**20:.1f} MiB) wait on {config.musubi_block_swap_device}")
        if config.ramtorch:
            from simpletuner.models.ramtorch import install_ramtorch

            self.ramtorch_swappers = install_ramtorch(model, config, self.compute_device,
                                                      copy_on_same_device=self.copy_on_same_device)
            total = sum(swapper.swapped_bytes for swapper in self.ramtorch_swappers)
            layers = sum(len(swapper.units) for swapper in self.ramtorch_swappers)
            self.notes.append(f"RamTorch: {layers} layers ({total / 2**20:.1f} MiB) stream from CPU memory")
        self._hide_swapped_weights_from_ddp(model)

    def _hide_swapped_weights_from_ddp(self, model) -> None:
        """Swapped frozen weights wait off the accelerator; DDP (several processes) must not see them."""
        swappers = [swapper for swapper in (self.block_swapper, *self.ramtorch_swappers) if swapper is not None]
        if not swappers:
            return
        from simpletuner.training.distributed import hide_from_ddp

        hidden = 0
        for module in (model.denoiser, *text_encoders_of(model).values()):
            names = [name for swapper in swappers for name in swapper.swapped_names(module)]
            hide_from_ddp(module, names)
            hidden += len(names)
        logger.info("with several processes, DDP ignores the %d swapped frozen tensors (they stay off the accelerator)",
                    hidden)

    # --- saving -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def saving(self, model, text_encoders: dict[str, torch.nn.Module] | None = None) -> Iterator[None]:
        """``--offload_during_save``: what is written waits on the CPU while it is serialised."""
        if not self.config.offload_during_save:
            yield
            return
        written = {model.denoiser_name: model.denoiser, **(text_encoders or {})}
        for name, module in written.items():
            self.placement.move(name, module, "offload", "offload during save")
        try:
            yield
        finally:
            for name, module in written.items():
                self.placement.move(name, module, "compute", "save done")

    def describe(self) -> str | None:
        return "memory:       " + "; ".join(self.notes) if self.notes else None
