"""What one process really holds of the trained model's state under FSDP2 / DeepSpeed ZeRO: a census.

The memory planner (simpletuner/memory/sharding.py) says how FSDP2 and ZeRO divide the weights, the
gradients, the optimizer state and DeepSpeed's fp32 master weights across the processes. This module
counts those bytes in a real run, so the plan can be checked against them (benchmarks/sharded_memory.py):
with ``SIMPLETUNER_MEASURE_SHARDS=<folder>`` set, every process writes ``rank-<N>.json`` after each of
the first two optimizer steps.

When it counts: the hooks sit on the torch optimizer that really steps (inside DeepSpeed's ZeRO
optimizer when it runs, where it steps the fp32 master partitions). Just before it steps, the gradients
it consumes are alive; just after it, the optimizer state too (DeepSpeed frees its fp32 gradient
partition only after the base step). Under DeepSpeed, which reduces gradients into buckets during its
own backward pass, it also counts late in the backward pass and right after it. Two steps, because
ZeRO-3 gathers its persistent parameters at the end of every step, so only the second one's forward
and backward pass show them.

Bytes are counted per storage, once: a flat buffer (DeepSpeed's partitions and buckets, FSDP2's padded
shards) is counted whole, padding included, the first time any tensor viewing it is seen; a storage
freed by being resized to nothing counts nothing. DeepSpeed's buffers are found by walking its ZeRO
optimizer's attributes, so a buffer the plan does not know about still shows up, under the attribute
that holds it ("engine buffers").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

#: The environment variable naming the folder the census files go to; unset: no census.
ENV_VARIABLE = "SIMPLETUNER_MEASURE_SHARDS"

#: DeepSpeed ZeRO optimizer attributes -> the category of what they hold (the rest: "engine buffers").
DEEPSPEED_ATTRIBUTES = {
    # stages 1 and 2
    "single_partition_of_fp32_groups": "master weights",
    "bit16_groups_flat": "weights",
    "averaged_gradients": "gradients",
    "grads_in_partition": "gradients",
    "ipg_buckets": "reduce buckets",
    # stage 3
    "fp32_partitioned_groups_flat": "master weights",
    "fp16_partitioned_groups_flat": "weights",
    "grad_partitions_flat_buffer": "gradients",
}


class Ledger:
    """Bytes per category, each storage counted once (under the first category it is seen in)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.details: dict[str, int] = {}  # "engine buffers" by the attribute that holds them
        self._seen: set[tuple[str, int]] = set()

    def add(self, category: str, tensor, detail: str | None = None) -> None:
        local = _local(tensor)
        if local is None:
            return
        storage = local.untyped_storage()
        size = storage.nbytes()
        key = (str(local.device), storage.data_ptr())
        if size == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.bytes[category] = self.bytes.get(category, 0) + size
        if detail:
            self.details[detail] = self.details.get(detail, 0) + size


def _local(tensor):
    """The tensor this process stores: a DTensor's local slice, else the tensor itself."""
    import torch

    if tensor is None or not isinstance(tensor, torch.Tensor):
        return None
    local = getattr(tensor, "_local_tensor", None)  # FSDP2's DTensor
    return local if local is not None else tensor


def _tensors_in(value, depth: int = 0) -> Iterator:
    """Tensors inside an attribute value: lists, tuples, dicts and small objects (DeepSpeed's buckets)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 3:
        return
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif hasattr(value, "__dict__") and type(value).__module__.startswith("deepspeed.runtime.zero"):
        for item in vars(value).values():
            yield from _tensors_in(item, depth + 1)


def base_optimizer(optimizer):
    """The torch optimizer that really steps: inside accelerate's wrapper, and inside DeepSpeed's
    ZeRO optimizer (which is not a torch optimizer) when there is one."""
    import torch

    found, current = None, optimizer
    for _ in range(4):  # the innermost: accelerate's wrapper is a torch optimizer in name only
        if current is None:
            break
        if isinstance(current, torch.optim.Optimizer):
            found = current
        current = getattr(current, "optimizer", None)
    if found is None:
        raise TypeError(f"no torch optimizer inside {type(optimizer).__name__}")
    return found


def zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer inside accelerate's wrapper, or None."""
    current = optimizer
    for _ in range(4):
        if current is None:
            return None
        if hasattr(current, "single_partition_of_fp32_groups") or hasattr(current, "fp32_partitioned_groups_flat"):
            return current
        current = getattr(current, "optimizer", None)
    return None


def count(module, optimizer) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes this process holds, by category, and DeepSpeed's other buffers by attribute.

    Categories: ``trained weights`` / ``frozen weights`` (the module's parameters, this process's slice
    under FSDP2 and ZeRO-3), ``persistent weights`` / ``gathered weights`` (ZeRO-3 parameters present
    whole besides their slice: the small ones it keeps gathered, and those gathered for a running
    block), ``gradients``, ``optimizer state`` (the base optimizer's), ``master weights`` (DeepSpeed's
    fp32 partitions), ``reduce buckets`` and ``engine buffers`` (anything else DeepSpeed's optimizer keeps).
    The order matters: a storage counts under the first category that sees it.
    """
    ledger = Ledger()
    zero = zero_optimizer(optimizer)
    inner = base_optimizer(optimizer)
    parameters = list(module.parameters())
    _count_weights(ledger, parameters)
    if zero is not None:
        # before the gradients: the fp32 partitions (which the base optimizer steps) have gradients of
        # their own, and under ZeRO-2/3 the parameters' gradients are views into the reduce buckets
        for attribute, category in DEEPSPEED_ATTRIBUTES.items():
            if category in ("master weights", "reduce buckets"):
                for tensor in _tensors_in(getattr(zero, attribute, None)):
                    ledger.add(category, tensor)
    stepped = [parameter for group in inner.param_groups for parameter in group["params"]]
    for tensor in [*parameters, *stepped]:
        ledger.add("gradients", tensor.grad)
    for state in inner.state.values():
        for tensor in _tensors_in(state):
            ledger.add("optimizer state", tensor)
    if zero is not None:
        _count_zero_attributes(ledger, zero)
    return ledger.bytes, ledger.details


def _count_weights(ledger: Ledger, parameters: list) -> None:
    for parameter in parameters:
        category = "trained weights" if parameter.requires_grad else "frozen weights"
        slice_ = getattr(parameter, "ds_tensor", None)  # ZeRO-3's slice
        ledger.add(category, slice_)
        if slice_ is None:
            ledger.add(category, parameter)
        else:  # ZeRO-3: a whole value beside the slice, kept for good (persistent) or gathered for a block
            whole = "persistent weights" if getattr(parameter, "ds_persist", False) else "gathered weights"
            ledger.add(whole, parameter)


def _count_zero_attributes(ledger: Ledger, zero) -> None:
    """Every tensor DeepSpeed's ZeRO optimizer holds, and their gradients; the attributes the table names
    first, so their views elsewhere count in the table's category."""
    for attribute in sorted(vars(zero), key=lambda name: name not in DEEPSPEED_ATTRIBUTES):
        category = DEEPSPEED_ATTRIBUTES.get(attribute, "engine buffers")
        for tensor in _tensors_in(getattr(zero, attribute)):
            if tensor.is_leaf:
                ledger.add("gradients", tensor.grad)
            ledger.add(category, tensor, detail=attribute if category == "engine buffers" else None)


#: How many optimizer steps the census follows (see the module docstring).
STEPS = 2


class Census:
    """Counts (:func:`count`) at each moment of the first :data:`STEPS` optimizer steps, written to
    ``folder/rank-<rank>.json`` after every step (keys ``"<step>/<moment>"``)."""

    def __init__(self, module, optimizer, folder: Path, rank: int, context: dict[str, Any]) -> None:
        self.module, self.optimizer = module, optimizer
        self.target = folder / f"rank-{rank}.json"
        self.record: dict[str, Any] = {"rank": rank, **context, "moments": {}, "engine_buffers": {}}
        self.step = 1
        self.handles: list = []

    def take(self, moment: str) -> None:
        key = f"{self.step}/{moment}"
        if self.step <= STEPS and key not in self.record["moments"]:
            self.record["moments"][key], details = count(self.module, self.optimizer)
            self.record["engine_buffers"].update(details)

    def install(self) -> None:
        inner = base_optimizer(self.optimizer)
        self.handles.append(inner.register_step_pre_hook(lambda *_: self.take("before step")))
        self.handles.append(inner.register_step_post_hook(lambda *_: self.finish_step()))
        if zero_optimizer(self.optimizer) is None:
            return
        # DeepSpeed reduces the gradients inside its backward (into buckets) and partitions them in its
        # own step: count late in the backward pass (when the first-used weight gets its gradient) and
        # after it, before the engine steps
        first = next((p for p in self.module.parameters() if p.requires_grad), None)
        if first is not None:
            self.handles.append(first.register_hook(lambda _grad: self.take("in backward")))
        engine_step = self.module.step

        def step_after_counting(*args, **kwargs):
            self.take("after backward")
            return engine_step(*args, **kwargs)

        self.module.step = step_after_counting  # on this engine only; removed after the last step

    def finish_step(self) -> None:
        self.take("after step")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        partial = self.target.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.record, indent=1), encoding="utf-8")
        partial.replace(self.target)
        self.step += 1
        if self.step > STEPS:
            for handle in self.handles:
                handle.remove()
            self.module.__dict__.pop("step", None)  # the engine's own step again


def install_if_requested(trainer) -> bool:
    """Install the census on a trainer whose model and optimizer are prepared, when
    ``SIMPLETUNER_MEASURE_SHARDS`` names a folder. Returns whether it did."""
    folder = os.environ.get(ENV_VARIABLE)
    if not folder or getattr(trainer, "shard_census", None) is not None:  # not asked for, or in already
        return False
    accelerator = trainer.accelerator
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    context = {"engine": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
               "zero_stage": getattr(plugin, "zero_stage", None) if plugin is not None else None,
               "model_type": trainer.config.model_type, "mixed_precision": trainer.config.mixed_precision}
    trainer.shard_census = Census(trainer.model.denoiser, trainer.optimizer, Path(folder),
                                  accelerator.process_index, context)
    trainer.shard_census.install()
    return True
