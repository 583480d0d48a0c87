"""Per-rank accelerator memory when FSDP2 or DeepSpeed ZeRO splits the training state across processes.

The single-process estimate (:func:`simpletuner.memory.planner.estimate`) lists what one accelerator
holds. Sharding divides some of those parts by the shard degree and leaves the rest:

- **FSDP2** (``--fsdp_enable``; degree ``--hsdp_shard_dim``, else ``--num_processes``) shards the
  denoiser: its weights (frozen ones too), the adapter, their gradients, the optimizer state and an
  EMA kept beside them. While a block runs its weights are gathered whole: with
  ``--fsdp_reshard_after_forward`` (the default) about two blocks at a time (the running one and the
  one fetched ahead), without it every block's gathered weights stay until the backward pass.
- **ZeRO** (``--zero_stage``; degree ``--num_processes``): stage 1 shards the optimizer state (and,
  for full training below fp32, the fp32 master weights DeepSpeed keeps), stage 2 also the
  gradients, stage 3 also the weights, gathered block by block like FSDP. ``offload_optimizer`` /
  ``offload_param`` in ``--deepspeed_config`` move their part to the host (see memory/host.py).

Activations, the text encoders and the VAE are never sharded: every rank runs its own batch through
the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from simpletuner.memory.units import format_size

#: Parts of the estimate that belong to the trained model's state (sharded by FSDP2 / ZeRO-3 alike).
WEIGHT_PARTS = ("denoiser weights", "adapter weights")
#: Parts the planner derives peaks from rather than sums (see :func:`peaks`).
TRANSIENT_PARTS = ("gradients", "activations")


@dataclass
class ShardingPlan:
    """The estimate's parts for one rank, and how each was divided."""

    engine: str  # "FSDP2", "HSDP", "ZeRO-1" ... "ZeRO-3"
    degree: int
    full: dict[str, float]
    per_rank: dict[str, float]
    training_peak: float
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [f"per-rank accelerator memory ({self.engine}, sharded over {self.degree} processes):"]
        for name, value in self.per_rank.items():
            whole = self.full.get(name)
            if not value and not whole:
                continue
            divided = f"  (1/{self.degree} of {format_size(whole)})" if whole and abs(whole - value) > 0.5 else ""
            lines.append(f"  {name:<28} {format_size(value):>12}{divided}")
        lines.append(f"  {'training peak per rank':<28} {format_size(self.training_peak):>12}")
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def shard_degree(config) -> int:
    """Over how many processes the sharded state is split (1 when nothing shards)."""
    processes = int(config.num_processes or 1)
    if config.fsdp_enable:
        return int(config.hsdp_shard_dim or processes)
    if config.zero_stage or config.deepspeed_config:
        return processes
    return 1


def zero_stage_of(config) -> int | None:
    """The ZeRO stage a run uses (None without DeepSpeed)."""
    if config.zero_stage:
        return int(config.zero_stage)
    if config.deepspeed_config:
        from simpletuner.training.deepspeed import DEFAULT_STAGE, user_deepspeed_config

        zero = user_deepspeed_config(config).get("zero_optimization") or {}
        stage = zero.get("stage")
        return int(stage) if isinstance(stage, int) else DEFAULT_STAGE
    return None


def peaks(parts: dict[str, float], set_grads_to_none: bool) -> float:
    """The training peak from parts, as :func:`~simpletuner.memory.planner.estimate` forms it: the
    forward/backward peak or the optimizer step (gradients plus one temporary of their size)."""
    static = sum(value for name, value in parts.items() if name not in TRANSIENT_PARTS)
    gradients, activations = parts.get("gradients", 0.0), parts.get("activations", 0.0)
    forward_backward = static + (0.0 if set_grads_to_none else gradients) + activations
    return max(forward_backward, static + 2 * gradients)


def _largest_block(inventory, element: int) -> float:
    return max((parameters for _, parameters, _ in inventory.blocks()), default=0) * element


def _fsdp(parts: dict[str, float], degree: int, inventory, settings, config) -> tuple[dict[str, float], list[str]]:
    element = 2 if settings.mixed_precision in ("bf16", "fp16") else 4
    rank = dict(parts)
    for name in (*WEIGHT_PARTS, "gradients", "optimizer state", "ema weights"):
        if name in rank:
            rank[name] = parts[name] / degree
    if config.fsdp_reshard_after_forward:
        rank["gathered blocks"] = 2 * _largest_block(inventory, element)
        note = "gathered blocks: the running block and the one fetched ahead, whole"
    else:
        rank["gathered blocks"] = parts.get("denoiser weights", 0.0) - rank.get("denoiser weights", 0.0)
        note = "--fsdp_reshard_after_forward false keeps every gathered block until the backward pass"
    return rank, [note]


def _zero(parts: dict[str, float], degree: int, stage: int, inventory, settings, config
          ) -> tuple[dict[str, float], list[str]]:
    from simpletuner.memory.host import trainable_parameters

    rank = dict(parts)
    notes = []
    offload = _offloaded_sections(config)
    count, element = trainable_parameters(inventory, settings)
    if element < 4:
        rank["fp32 master weights"] = count * 4 / degree
        notes.append("DeepSpeed keeps fp32 master weights for training below fp32, sharded from stage 1")
    rank["optimizer state"] = parts.get("optimizer state", 0.0) / degree
    if "offload_optimizer" in offload:
        rank["optimizer state"] = 0.0
        rank["fp32 master weights"] = 0.0
        notes.append("offload_optimizer: optimizer state and master weights live in host memory (host plan)")
    if stage >= 2:
        rank["gradients"] = parts.get("gradients", 0.0) / degree
    if stage >= 3:
        training_element = 2 if settings.mixed_precision in ("bf16", "fp16") else 4
        for name in WEIGHT_PARTS:
            if name in rank:
                rank[name] = parts[name] / degree
        rank["gathered blocks"] = 2 * _largest_block(inventory, training_element)
        if "offload_param" in offload:
            rank["denoiser weights"] = 0.0
            notes.append("offload_param: the weights' shards live in host memory (host plan)")
    return rank, notes


def _offloaded_sections(config) -> set[str]:
    from simpletuner.training.deepspeed import user_deepspeed_config

    try:
        zero = user_deepspeed_config(config).get("zero_optimization") or {}
    except (ValueError, OSError):
        return set()
    return {key for key in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(key), dict) and str(zero[key].get("device", "none")).lower() == "cpu"}


def plan_sharding(estimate, inventory, config) -> ShardingPlan | None:
    """The per-rank parts of ``estimate`` under the run's sharding (None when the run does not shard)."""
    degree = shard_degree(config)
    settings = estimate.settings
    parts = dict(estimate.parts)
    if config.fsdp_enable:
        engine = "HSDP" if config.hsdp_replicate_dim else "FSDP2"
        rank, notes = _fsdp(parts, degree, inventory, settings, config)
    else:
        stage = zero_stage_of(config)
        if not stage:  # no DeepSpeed, or stage 0 (plain data parallel)
            return None
        engine = f"ZeRO-{stage}"
        rank, notes = _zero(parts, degree, stage, inventory, settings, config)
    notes.append("activations, text encoders and the VAE are not sharded (each rank runs its own batch)")
    return ShardingPlan(engine, degree, parts, rank, peaks(rank, settings.set_grads_to_none), notes)
