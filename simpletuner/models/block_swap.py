"""Block swap: frozen weights that live on a swap device and visit the compute device only to be used.

``--musubi_blocks_to_swap N`` keeps the frozen weights of the denoiser's last N transformer blocks on
``--musubi_block_swap_device`` (normally the CPU). Just before a swapped block runs, its weights are
copied to the compute device; right after, the copies are dropped again. The backward pass needs
them once more, and two cases are handled:

- A block that is recomputed (gradient checkpointing) simply runs its forward again in the backward
  pass, so the same hooks copy its weights in for the recomputation, and autograd drops them when
  the block's backward is done.
- A block that is not recomputed would normally keep its weight copies alive inside autograd's saved
  tensors, which defeats the purpose. A saved-tensors hook around the whole denoiser replaces every
  saved tensor that *is* a swapped weight copy (or a view of one: ``weight.t()``) by a small
  reference; unpacking it in the backward pass copies the block in again. A callback queued on the
  autograd engine puts every block back on the swap device when the backward pass ends.

Only tensors that do not train (frozen base weights and buffers) are swapped. Trainable tensors
(LoRA adapters inside a swapped block) stay on the compute device, so their gradients and optimizer
state never change device; full fine-tuning, where every weight trains, is refused at validation.

The same mechanism swaps single modules (``--ramtorch``: each selected Linear layer is a unit).

What a CPU-only test can prove: when the compute and swap devices are both the CPU, ``.to()`` would
hand back the very same tensor, so :class:`WeightSwapper` has ``copy_on_same_device`` to make a
distinct copy each time. The storage identity of a weight then shows where it "is": the swap
master's storage between uses, a fresh compute copy while the block runs. That proves the
mechanics (when copies are made and released, that gradients are unchanged, that nothing keeps a
copy alive); it cannot measure a real host-to-device transfer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One swapped tensor: where it is registered and its master copy on the swap device."""

    owner: torch.nn.Module
    key: str
    is_parameter: bool
    master: torch.Tensor
    compute: torch.Tensor | None = None

    def current(self) -> torch.Tensor:
        return self.owner._parameters[self.key] if self.is_parameter else self.owner._buffers[self.key]

    def point_at(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.owner._parameters[self.key].data = tensor
        else:
            self.owner._buffers[self.key] = tensor


@dataclass
class _Unit:
    """A module whose frozen tensors move together."""

    index: int
    name: str
    module: torch.nn.Module
    slots: list[_Slot] = field(default_factory=list)
    resident: bool = False

    @property
    def nbytes(self) -> int:
        return sum(slot.master.numel() * slot.master.element_size() for slot in self.slots)


@dataclass(frozen=True)
class _WeightRef:
    """What the saved-tensors hook stores instead of a swapped weight copy (or a view of one)."""

    unit: int
    slot: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class WeightSwapper:
    """Keep the frozen tensors of ``units`` on ``swap_device``; copy them to ``compute_device`` while
    each unit runs, forward and backward.

    Args:
        units: ``(name, module)`` pairs; each module's frozen parameters and buffers move together.
        root: the module whose forward contains every unit (the denoiser); the saved-tensors hook
            lives around its forward. None (e.g. text encoders that never train) skips the hook.
        compute_device / swap_device: where the units run and where they wait.
        copy_on_same_device: make a distinct copy even when the two devices are the same (tests).
        pin_memory: pin the masters in page-locked host memory for asynchronous copies (CUDA only).
    """

    def __init__(self, units: list[tuple[str, torch.nn.Module]], root: torch.nn.Module | None,
                 compute_device: torch.device | str, swap_device: torch.device | str,
                 copy_on_same_device: bool = False, pin_memory: bool | None = None):
        self.compute_device = torch.device(compute_device)
        self.swap_device = torch.device(swap_device)
        self.copy_on_same_device = copy_on_same_device
        if pin_memory is None:
            pin_memory = self.swap_device.type == "cpu" and self.compute_device.type == "cuda"
        self.pin_memory = pin_memory
        self.non_blocking = self.compute_device.type == "cuda"
        self.units = [_Unit(index, name, module) for index, (name, module) in enumerate(units)]
        self._live: dict[int, tuple[int, int]] = {}  # data_ptr of a compute copy -> (unit, slot)
        self._resident: set[int] = set()  # indices of the units on the compute device
        self._callback_queued = False
        self._handles: list = []
        self._hook_context = None
        self.copies_made = 0  # copies to the compute device, for logs and tests
        self.peak_resident_bytes = 0
        self._resident_bytes = 0
        for unit in self.units:
            self._take(unit)
            self._handles.append(unit.module.register_forward_pre_hook(self._before_unit(unit)))
            self._handles.append(unit.module.register_forward_hook(self._after_unit(unit), always_call=True))
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(self._enter_root))
            self._handles.append(root.register_forward_hook(self._exit_root, always_call=True))

    # --- installation ---------------------------------------------------------------------------

    def _take(self, unit: _Unit) -> None:
        """Move the unit's frozen tensors to the swap device, its trainable ones to the compute
        device, and keep ``module.to()`` from moving the frozen ones afterwards."""
        for module in unit.module.modules():
            keys: list[tuple[str, bool]] = []
            for key, param in module._parameters.items():
                if param is None:
                    continue
                if param.requires_grad:
                    param.data = param.data.to(self.compute_device)
                    if param.grad is not None:
                        param.grad = param.grad.to(self.compute_device)
                    continue
                keys.append((key, True))
            keys += [(key, False) for key, buf in module._buffers.items() if buf is not None]
            for key, is_parameter in keys:
                tensor = module._parameters[key] if is_parameter else module._buffers[key]
                master = tensor.detach().to(self.swap_device)
                if self.pin_memory and master.device.type == "cpu":
                    master = master.pin_memory()
                slot = _Slot(module, key, is_parameter, master)
                slot.point_at(master)
                unit.slots.append(slot)
            if keys:
                _skip_swapped_in_apply(module, {key for key, _ in keys})

    def remove(self) -> None:
        """Undo the hooks; every unit's tensors stay where they are (on the swap device)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for unit in self.units:
            for module in unit.module.modules():
                module.__dict__.pop("_apply", None)

    def swapped_names(self, root: torch.nn.Module) -> list[str]:
        """Qualified names, relative to ``root``, of the frozen parameters and buffers this swapper keeps
        on the swap device (empty when none of its units lies inside ``root``).

        DDP checks that every parameter of the module it wraps sits on one device type and broadcasts
        them at start-up; these names let it leave the swapped ones alone (they never train and are
        the same on every process, loaded from the same files)."""
        keys_by_owner: dict[int, list[str]] = {}
        for unit in self.units:
            for slot in unit.slots:
                keys_by_owner.setdefault(id(slot.owner), []).append(slot.key)
        names = []
        for prefix, module in root.named_modules(remove_duplicate=False):
            names += [f"{prefix}.{key}" if prefix else key for key in keys_by_owner.get(id(module), ())]
        return names

    @property
    def swapped_bytes(self) -> int:
        """Bytes that live on the swap device instead of the compute device."""
        return sum(unit.nbytes for unit in self.units)

    # --- moving ---------------------------------------------------------------------------------

    def onload(self, unit: _Unit) -> None:
        if unit.resident:
            return
        for index, slot in enumerate(unit.slots):
            copy = slot.master.to(self.compute_device, non_blocking=self.non_blocking,
                                  copy=self.copy_on_same_device)
            slot.compute = copy
            slot.point_at(copy)
            self._live[copy.untyped_storage().data_ptr()] = (unit.index, index)
        unit.resident = True
        self._resident.add(unit.index)
        self.copies_made += 1
        self._resident_bytes += unit.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self._resident_bytes)

    def offload(self, unit: _Unit) -> None:
        if not unit.resident:
            return
        for slot in unit.slots:
            if slot.compute is not None:
                self._live.pop(slot.compute.untyped_storage().data_ptr(), None)
            slot.compute = None
            slot.point_at(slot.master)
        unit.resident = False
        self._resident.discard(unit.index)
        self._resident_bytes -= unit.nbytes

    def offload_all(self) -> None:
        for index in list(self._resident):
            self.offload(self.units[index])
        self._callback_queued = False

    def _only(self, unit: _Unit) -> None:
        """``unit`` on the compute device, every other unit back on the swap device."""
        for index in list(self._resident):
            if index != unit.index:
                self.offload(self.units[index])
        self.onload(unit)

    def resident_units(self) -> list[str]:
        return [unit.name for unit in self.units if unit.resident]

    # --- hooks ----------------------------------------------------------------------------------

    def _before_unit(self, unit: _Unit):
        def hook(module, args):
            self._only(unit)  # one unit on the compute device at a time
        return hook

    def _after_unit(self, unit: _Unit):
        def hook(module, args, output):
            self.offload(unit)
        return hook

    def _enter_root(self, module, args) -> None:
        if torch.is_grad_enabled() and self._hook_context is None:
            self._hook_context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hook_context.__enter__()

    def _exit_root(self, module, args, output) -> None:
        if self._hook_context is not None:
            context, self._hook_context = self._hook_context, None
            context.__exit__(None, None, None)

    def _pack(self, tensor: torch.Tensor):
        if not self._live or tensor.device != self.compute_device:
            return tensor
        hit = self._live.get(tensor.untyped_storage().data_ptr())
        if hit is None:
            return tensor
        return _WeightRef(hit[0], hit[1], tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, _WeightRef):
            return packed
        unit = self.units[packed.unit]
        if not unit.resident:
            self._only(unit)
        if not self._callback_queued:  # put every unit back once this backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self.offload_all)
            self._callback_queued = True
        base = unit.slots[packed.slot].compute
        return base.as_strided(packed.size, packed.stride, packed.offset)


def _skip_swapped_in_apply(module: torch.nn.Module, keys: set[str]) -> None:
    """Make ``module.to()`` / ``.cuda()`` / ``.float()`` leave the swapped tensors alone: the swapper
    owns their placement. (accelerate's ``prepare`` moves the whole denoiser to the device.)"""
    original = type(module)._apply

    def _apply(fn, recurse=True):
        held = {}
        for key in keys:
            if key in module._parameters:
                held[key] = (True, module._parameters[key])
                module._parameters[key] = None
            elif key in module._buffers:
                held[key] = (False, module._buffers[key])
                module._buffers[key] = None
        try:
            return original(module, fn, recurse)
        finally:
            for key, (is_parameter, tensor) in held.items():
                (module._parameters if is_parameter else module._buffers)[key] = tensor

    module._apply = _apply


def last_blocks(blocks: list[tuple[str, torch.nn.Module]], count: int) -> list[tuple[str, torch.nn.Module]]:
    """The last ``count`` blocks in execution order (musubi's choice: the first blocks run first, so
    keeping them resident lets the forward start without waiting for a copy)."""
    if count <= 0:
        return []
    if count > len(blocks):
        raise ValueError(f"--musubi_blocks_to_swap {count}: the denoiser has only {len(blocks)} transformer blocks")
    return blocks[len(blocks) - count:]


def install_block_swap(model, count: int, compute_device, swap_device, copy_on_same_device: bool = False
                       ) -> WeightSwapper:
    """Swap the last ``count`` of ``model.transformer_blocks()`` (a :class:`ModelFamily`)."""
    blocks = model.transformer_blocks()
    if not blocks:
        raise ValueError(f"{model.family}: the denoiser has no repeated transformer blocks to swap "
                         "(--musubi_blocks_to_swap applies to transformer models such as flux, sd3 and pixart_sigma)")
    chosen = last_blocks(blocks, count)
    swapper = WeightSwapper(chosen, model.denoiser, compute_device, swap_device,
                            copy_on_same_device=copy_on_same_device)
    logger.info("block swap: %d of %d blocks (%.1f MiB of frozen weights) wait on %s, run on %s",
                len(chosen), len(blocks), swapper.swapped_bytes / 2**20, swapper.swap_device, swapper.compute_device)
    return swapper
