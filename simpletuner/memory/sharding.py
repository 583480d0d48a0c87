"""Per-rank accelerator memory when FSDP2 or DeepSpeed ZeRO splits the training state across processes.

The single-process estimate (:func:`simpletuner.memory.planner.estimate`) lists what one accelerator
holds. Sharding divides some of those parts by the shard degree and leaves the rest:

- **FSDP2** (``--fsdp_enable``; degree ``--hsdp_shard_dim``, else ``--num_processes``) shards the
  denoiser: its weights (frozen ones too), the adapter, their gradients, the optimizer state and an
  EMA kept beside them. While a block runs its weights are gathered whole: with
  ``--fsdp_reshard_after_forward`` (the default) about two blocks at a time (the running one and the
  one fetched ahead), without it every block's gathered weights stay until the backward pass.
- **ZeRO** (``--zero_stage``; degree ``--num_processes``): stage 1 shards the optimizer state and the
  fp32 master weights DeepSpeed keeps at every precision, stage 2 also the gradients, stage 3 also the
  weights (except the small ones it keeps whole), gathered block by block like FSDP. DeepSpeed adds
  its gradient reduce buckets, a fixed size whatever the model. ``offload_optimizer`` /
  ``offload_param`` in ``--deepspeed_config`` move their part to the host (see memory/host.py).

The divided parts were measured on 2 gloo CPU processes with benchmarks/sharded_memory.py (every part
within 6% of this plan, for FSDP2 and ZeRO 1/2/3, full and LoRA, fp32 and bf16; the table is in
documentation/MEMORY.md); :func:`_zero` says what those runs showed about DeepSpeed.

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
            lines.append(f"  {name:<28} {format_size(value):>12}{self._against_one_process(value, whole)}")
        lines.append(f"  {'training peak per rank':<28} {format_size(self.training_peak):>12}")
        lines += [f"  note: {note}" for note in self.notes]
        return lines

    def _against_one_process(self, value: float, whole: float | None) -> str:
        """How a part compares with the single-process estimate: divided, or otherwise changed (ZeRO's
        gradients and the optimizer state of its fp32 masters are not simply a fraction of it)."""
        if not whole or abs(whole - value) <= 0.5:
            return ""
        if abs(whole / self.degree - value) <= 0.5:
            return f"  (1/{self.degree} of {format_size(whole)})"
        return f"  (one process: {format_size(whole)})"


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
    notes = []
    if config.fsdp_reshard_after_forward:
        rank["gathered blocks"] = 2 * _largest_block(inventory, element)
        notes.append("gathered blocks: the running block and the one fetched ahead, whole")
    else:
        rank["gathered blocks"] = parts.get("denoiser weights", 0.0) - rank.get("denoiser weights", 0.0)
        notes.append("--fsdp_reshard_after_forward false keeps every gathered block until the backward pass")
    if config.model_type == "full" and element == 2:
        # accelerate upcasts the trained weights to fp32 before sharding them; FSDP2's mixed-precision
        # policy computes in bf16 / fp16 from those fp32 slices, so the slices, their gradients and
        # the optimizer's moments are all fp32-sized (measured by benchmarks/sharded_memory.py)
        for name in ("denoiser weights", "gradients", "optimizer state"):
            if name in rank:
                rank[name] *= 4 / element
        notes.append(f"trained weights held as fp32 slices (FSDP2 computes in {settings.mixed_precision} from them)")
    return rank, notes


#: DeepSpeed's own defaults (deepspeed/runtime/zero/config.py, 0.19) for the ``zero_optimization`` settings
#: that size what a rank holds; ``--deepspeed_config`` may set them.
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_param_persistence_threshold": 100_000,
                      "stage3_model_persistence_threshold": None, "contiguous_gradients": True}


def _zero_section(config) -> dict:
    """``zero_optimization`` of ``--deepspeed_config`` ({} when unset or unreadable: validation reports it)."""
    from simpletuner.training.deepspeed import user_deepspeed_config

    try:
        zero = user_deepspeed_config(config).get("zero_optimization")
    except (ValueError, OSError):
        return {}
    return zero if isinstance(zero, dict) else {}


def _zero_setting(zero: dict, key: str):
    """A sizing setting from the DeepSpeed config, or DeepSpeed's default where it is missing or "auto"
    (accelerate fills "auto" from the model's ``hidden_size``, which diffusers models do not have)."""
    value = zero.get(key)
    default = DEEPSPEED_DEFAULTS[key]
    if isinstance(default, bool):
        return value if isinstance(value, bool) else default
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def reduce_buckets(zero: dict, stage: int, element: int) -> float:
    """Bytes of DeepSpeed's gradient reduce buckets on each rank.

    With ``contiguous_gradients`` (the default) DeepSpeed allocates a flat buffer of ``reduce_bucket_size``
    elements in the trained weights' dtype, however small the model: by default 5e8 elements, 1.9 GiB in
    fp32 and 0.93 GiB in bf16. Stages 1 and 2 hold it while the backward pass runs (two with
    ``overlap_comm``), stage 3 for the whole run (one)."""
    if not _zero_setting(zero, "contiguous_gradients"):
        return 0.0
    buffers = 2 if stage < 3 and zero.get("overlap_comm") is True else 1
    return float(_zero_setting(zero, "reduce_bucket_size") * element * buffers)


def persistent_parameters(inventory, settings, zero: dict) -> int:
    """Elements ZeRO-3 keeps whole on every rank besides their slices: each trained-model parameter of at
    most ``stage3_param_persistence_threshold`` elements (default 100,000: norms, biases, and in a small
    model whole projections; LoRA's A and B matrices nearly always). DeepSpeed gathers them at the end of
    every optimizer step and keeps them through the next forward and backward pass, to save a gather
    per small tensor."""
    threshold = _zero_setting(zero, "stage3_param_persistence_threshold")
    small = sum(t.numel for t in inventory.denoiser.tensors if t.numel <= threshold)
    if settings.model_type == "lora":
        rank = settings.lora_rank
        for tensor in inventory.denoiser.linear_weights():
            if _lora_target(tensor.name, settings.lora_targets):
                out_features, in_features = tensor.shape
                small += sum(n for n in (rank * in_features, out_features * rank) if n <= threshold)
    limit = _zero_setting(zero, "stage3_model_persistence_threshold")
    return min(small, limit) if limit is not None else small


def _lora_target(weight_name: str, targets: tuple[str, ...]) -> bool:
    """Whether LoRA adapts the Linear layer owning ``weight_name`` (as planner.lora_parameters decides)."""
    module = weight_name[: -len(".weight")]
    return any(module == target or module.endswith("." + target) for target in targets)


def _zero(parts: dict[str, float], degree: int, stage: int, inventory, settings, config
          ) -> tuple[dict[str, float], list[str]]:
    """ZeRO's per-rank parts, as measured on 2 processes (benchmarks/sharded_memory.py, DeepSpeed 0.19):

    - DeepSpeed casts the whole model to bf16 / fp16 when that is the mixed precision, LoRA adapters
      included, and steps an fp32 master copy of each rank's partition of the trained weights at every
      precision (it clones them when they are fp32 already): 4 bytes per trained parameter / N;
    - the optimizer steps those fp32 masters, so its state has the size it has for fp32 weights, / N;
    - gradients: stage 1 keeps every gradient whole until the backward pass ends; at the step every
      stage holds the fp32 gradient of the master partition (4 bytes / N), stage 3 beside its own
      partition of the gradients in the weights' dtype;
    - weights: whole below stage 3; stage 3 slices them, but keeps its persistent parameters whole
      (:func:`persistent_parameters`);
    - the reduce buckets (:func:`reduce_buckets`), whatever the model's size.
    """
    from simpletuner.memory.host import trainable_parameters

    zero = _zero_section(config)
    offload = _offloaded_sections(config)
    count, _ = trainable_parameters(inventory, settings)
    element = 2 if settings.mixed_precision in ("bf16", "fp16") else 4  # DeepSpeed casts the whole model
    rank = dict(parts)
    if "adapter weights" in rank:
        rank["adapter weights"] = count * element
    notes: list[str] = []
    rank.update(_zero_training_state(count, element, degree, stage, settings.optimizer, offload, notes))
    buckets = reduce_buckets(zero, stage, element)
    if buckets:
        rank["reduce buckets"] = buckets
        notes.append(f"reduce buckets: {_zero_setting(zero, 'reduce_bucket_size'):,} gradient elements; set "
                     "zero_optimization.reduce_bucket_size in --deepspeed_config to shrink them"
                     + (" (held during the backward pass)" if stage < 3 else ""))
    if stage >= 3:
        for name in WEIGHT_PARTS:
            if name in rank:
                rank[name] = rank[name] / degree
        persistent = persistent_parameters(inventory, settings, zero)
        rank["persistent weights (ZeRO-3)"] = persistent * element
        notes.append(f"ZeRO-3 keeps {persistent:,} elements of small parameters whole on every rank "
                     "(zero_optimization.stage3_param_persistence_threshold)")
        rank["gathered blocks"] = 2 * _largest_block(inventory, element)
        if "offload_param" in offload:
            rank["denoiser weights"] = 0.0
            notes.append("offload_param: the weights' shards live in host memory (host plan)")
    return rank, notes


def _zero_training_state(count: int, element: int, degree: int, stage: int, optimizer: str, offload: set[str],
                         notes: list[str]) -> dict[str, float]:
    """Master weights, optimizer state and gradients per rank for ``count`` trained parameters."""
    from simpletuner.memory.planner import optimizer_state_bytes

    master = count * 4 / degree
    state = count * optimizer_state_bytes(optimizer, 4) / degree
    notes.append("DeepSpeed steps an fp32 master copy of this rank's partition of the trained weights (also "
                 "when they are fp32 already); the optimizer state is that of fp32 weights")
    at_step = count * 4 / degree  # the fp32 gradient of the master partition
    partition = count * element / degree  # ZeRO-3's own partition of the gradients
    if "offload_optimizer" in offload:
        # from DeepSpeed's code, not measured (on the CPU host and device are one): both gradient
        # partitions are kept in host memory with the masters, and the host plan counts them
        master = state = at_step = partition = 0.0
        notes.append("offload_optimizer: optimizer state, master weights and the gradient partitions live in "
                     "host memory (host plan)")
    gradients = {1: max(count * element, at_step), 2: at_step}.get(stage, partition + at_step)
    return {"fp32 master weights": master, "optimizer state": state, "gradients": gradients}


def _offloaded_sections(config) -> set[str]:
    zero = _zero_section(config)
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
