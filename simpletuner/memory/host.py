"""The host-RAM plan: what a run keeps in CPU memory, term by term, and whether the machine has it.

Accelerator memory is only half of what decides whether a run starts: a model that fits on the GPU
can still be killed by the kernel's out-of-memory killer while it loads, because every process reads
the whole checkpoint into CPU memory first, and the options that save GPU memory (block swap, group
offload, RamTorch, a CPU-resident EMA) do so by moving bytes *into* CPU memory. This module lists
each of those terms with its size and the option that drives it, per process, and sums them per
phase of a run, because the terms do not all exist at once:

- ``load``: every component read from its safetensors files into CPU memory in its stored dtype
  before it is cast and placed (families load all components, then place them).
- ``quantize``: ``--quantize_via cpu`` moves each quantized component to the CPU and builds the
  quantized copy next to the full-precision one.
- ``caching``: building the latent and text caches: images decoded ahead, components parked on the
  CPU by ``--offload_during_startup``, the in-RAM copy of cache entries.
- ``training``: swapped blocks, offloaded components, RamTorch layers, EMA on the CPU, optimizer state
  offloaded by DeepSpeed, the prefetch queue, the in-RAM cache entries.
- ``saving``: the bytes a checkpoint write holds on the CPU (safetensors serializes the whole state
  dict in memory; ``--offload_during_save`` moves the weights there first; FSDP gathers the full
  optimizer state on the main process).

Every phase also pays the process baseline (Python, torch and the libraries the trainer imports),
measured by ``benchmarks/host_memory.py``. A machine runs ``--num_processes`` processes, each with its
own copy of everything above, so the machine total is the per-process peak times the process count.

Torch-free like the rest of the planner: sizes come from the model inventory and the config.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

from simpletuner.memory.units import format_size

#: Resident memory of a trainer process before it loads a model: the interpreter, torch, diffusers,
#: transformers, peft and accelerate imported (benchmarks/host_memory.py measures it; 0.55 GiB on the
#: Linux/CPU machine of the table in documentation/MEMORY.md). A CUDA context adds its own host
#: memory on top, which this constant does not include.
PROCESS_BASELINE_BYTES = int(0.55 * 2**30)
#: Cached entries kept in RAM after their first read, at most (simpletuner.data.cache.store).
TENSOR_MEMORY_BUDGET_BYTES = 2 * 2**30
#: Picture file suffixes the dataset scanner reads (for counting a local dataset's entries).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jxl", ".avif")
PHASES = ("load", "quantize", "caching", "training", "saving")
#: The phases in which weights placed after loading live where the placement put them.
AFTER_LOAD = ("caching", "training", "saving")


@dataclass(frozen=True)
class HostTerm:
    """One thing held in CPU memory by each process: its size, the option behind it, and when it exists."""

    label: str
    nbytes: float
    option: str
    phases: tuple[str, ...]
    #: Held by the main process alone (the others have none of it): counted once in the machine total.
    main_only: bool = False

    def line(self) -> str:
        when = "all phases" if set(self.phases) == set(PHASES) else ", ".join(self.phases)
        return f"  {self.label:<40} {format_size(self.nbytes):>12}  {self.option} [{when}]"


@dataclass
class HostPlan:
    """The host terms of one process, the process count on this machine and the machine's RAM."""

    terms: list[HostTerm]
    processes: int = 1
    machine_ram: int | None = None
    notes: list[str] = field(default_factory=list)
    ram_label: str = "this machine's RAM"  # or "--host_ram" when planning for another machine

    def phase_total(self, phase: str, main: bool = True) -> float:
        """Bytes one process holds during ``phase``: every term that exists then (the main process's
        share by default, which is the larger; ``main=False`` for any other process)."""
        return sum(term.nbytes for term in self.terms if phase in term.phases and (main or not term.main_only))

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def per_process_peak(self) -> float:
        return self.phase_total(self.peak_phase)

    @property
    def machine_total(self) -> float:
        """All processes of this machine at their peak together (they go through the phases at the same
        moment): the main process's bytes plus the other processes' in the phase where their sum peaks."""
        return max(self.phase_total(phase) + (self.processes - 1) * self.phase_total(phase, main=False)
                   for phase in PHASES)

    def lines(self) -> list[str]:
        lines = ["host RAM plan (per process; phases in brackets):"]
        lines += [term.line() for term in self.terms if term.nbytes]
        lines.append(f"  {'peak per process (' + self.peak_phase + ')':<40} {format_size(self.per_process_peak):>12}")
        if self.processes > 1:
            lines.append(f"  {f'{self.processes} processes on this machine':<40} {format_size(self.machine_total):>12}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.machine_ram:
            verdict = "fits in" if self.machine_total <= self.machine_ram else "WARNING: more than"
            lines.append(f"  {verdict} {self.ram_label} ({format_size(self.machine_ram)})")
        return lines


# --- the machine ---------------------------------------------------------------------------------


def machine_ram() -> int | None:
    """Total RAM of this machine in bytes (psutil, else /proc/meminfo; None when neither answers)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def processes_on_this_machine(config, machines: int = 1) -> int:
    """``--num_processes`` (all machines together, as accelerate counts them) divided among ``machines``
    (the launcher's ``num_machines``)."""
    total = int(config.num_processes or 1)
    return max(1, -(-total // max(1, int(machines))))


# --- the terms -----------------------------------------------------------------------------------


def training_bytes(settings) -> int:
    return 2 if settings.mixed_precision in ("bf16", "fp16") else 4


def loaded_weights(inventory, config) -> list[HostTerm]:
    """Every component as stored on disk: families read all of them into CPU memory, then place them.
    With ``--fsdp_cpu_ram_efficient_loading`` only the main process reads the denoiser (the others
    build it without weights, training/fsdp.py ``loads_weights``)."""
    stored = sum(component.stored_bytes() for component in inventory.components.values())
    if not (config.fsdp_enable and config.fsdp_cpu_ram_efficient_loading and int(config.num_processes or 1) > 1):
        return [HostTerm("weights read at load", stored, "(every run; the model's stored dtype)", ("load",))]
    denoiser = inventory.denoiser.stored_bytes()
    return [HostTerm("weights read at load", stored - denoiser, "(every process; text encoders and VAE)", ("load",)),
            HostTerm("denoiser weights read at load", denoiser, "--fsdp_cpu_ram_efficient_loading (main process)",
                     ("load",), main_only=True)]


def quantization_copy(inventory, settings, config) -> HostTerm | None:
    """``--quantize_via cpu``: one component at a time on the CPU, with the quantizer's working copy.

    optimum-quanto's ``quantize`` first swaps every Linear / Conv2d for a quantizable layer holding its
    own full-precision copy of the weight, and only ``freeze`` replaces those copies, layer by layer, by
    the quantized data: the peak is the component plus a full-precision copy of those weights
    (measured: benchmarks/host_memory.py). torchao and bitsandbytes convert layer by layer: the
    component plus its quantized size at most."""
    from simpletuner.memory.planner import _weights
    from simpletuner.options.quantization_rules import PRESETS

    if (config.quantize_via or "cpu") != "cpu":
        return None
    element = training_bytes(settings)
    wanted = [(inventory.denoiser, settings.base_model_precision)]
    wanted += list(zip(inventory.text_encoders().values(), settings.text_encoder_precisions))
    sizes = []
    for component, precision in wanted:
        preset = PRESETS.get(precision)
        if preset is None:
            continue
        full = component.parameters * element
        if preset.backend == "quanto":
            quantizable = sum(t.numel for t in (*component.linear_weights(), *component.conv_weights()))
            sizes.append(full + quantizable * element)
        else:
            sizes.append(full + _weights(component, precision, element))
    if not sizes:
        return None
    return HostTerm("quantization working copy", max(sizes), "--quantize_via cpu", ("quantize",))


def swapped_blocks(inventory, settings, config) -> HostTerm | None:
    """Block swap's masters: the frozen weights of the last N blocks, in the weight dtype (pinned on CUDA)."""
    if not settings.blocks_to_swap or (config.musubi_block_swap_device or "cpu") != "cpu":
        return None
    blocks = inventory.blocks()[-settings.blocks_to_swap:]
    nbytes = sum(parameters for _, parameters, _ in blocks) * training_bytes(settings)
    return HostTerm(f"swapped blocks ({len(blocks)})", nbytes, f"--musubi_blocks_to_swap {settings.blocks_to_swap}",
                    AFTER_LOAD)


def frozen_component_bytes(inventory, settings) -> tuple[float, float]:
    """(text encoders, VAE) in the bytes they are kept in: the weight dtype (quantized encoders at their
    preset's size); the VAE stays fp32 below bf16."""
    from simpletuner.memory.planner import _weights

    element = training_bytes(settings)
    encoders = sum(_weights(component, settings.text_encoder_precisions[index] if index < 4 else "no_change", element)
                   for index, component in enumerate(inventory.text_encoders().values()))
    vae = inventory.components.get("vae")
    return encoders, (vae.parameters * element if vae is not None else 0.0)


def offloaded_components(inventory, settings, config) -> HostTerm | None:
    """Text encoders (unless they train) and the VAE kept in CPU memory by component or group offload."""
    if not settings.offload_frozen:
        return None
    encoders, vae = frozen_component_bytes(inventory, settings)
    nbytes = vae + (0.0 if settings.train_text_encoder else encoders)
    if config.enable_group_offload:
        if config.group_offload_to_disk_path:
            return HostTerm("text encoders + VAE (on disk)", 0.0, "--group_offload_to_disk_path", AFTER_LOAD)
        return HostTerm("text encoders + VAE offloaded", nbytes, "--enable_group_offload", AFTER_LOAD)
    return HostTerm("text encoders + VAE offloaded", nbytes, "--enable_model_cpu_offload", AFTER_LOAD)


def startup_parking(inventory, settings) -> HostTerm | None:
    """``--offload_during_startup``: the VAE waits on the CPU while captions are encoded and the text
    encoders while latents are encoded; the larger of the two is the peak."""
    if not settings.offload_during_startup or settings.offload_frozen:
        return None
    encoders, vae = frozen_component_bytes(inventory, settings)
    return HostTerm("encoders or VAE parked while caching", max(encoders, vae), "--offload_during_startup",
                    ("caching",))


def _ramtorch_matches(module: str, patterns: list[str] | None) -> bool:
    """A layer name against ``--ramtorch_target_modules``: a glob, or a bare name covering what is inside
    it. Class-name patterns cannot be checked without torch and match nothing here."""
    if not patterns:
        return True
    return any(fnmatch.fnmatch(module, p) or fnmatch.fnmatch(module, p + ".*") or module.endswith("." + p)
               for p in patterns)


def streamed_linear_weights(component, patterns: list[str] | None, percent: int, prefix: str = "") -> list:
    """The first ``percent`` percent (module order) of a component's Linear weights that match ``patterns``
    (and start with ``prefix``): the layers RamTorch converts."""
    chosen = [tensor for tensor in component.linear_weights()
              if tensor.name.startswith(prefix) and _ramtorch_matches(tensor.name[: -len(".weight")], patterns)]
    return chosen[: len(chosen) * max(0, min(100, int(percent))) // 100]


def _linear_bytes(component, patterns: list[str] | None, percent: int, element: int,
                  prefix: str = "") -> float:
    return sum(tensor.numel for tensor in streamed_linear_weights(component, patterns, percent, prefix)) * element


def ramtorch_layers(inventory, settings, config) -> HostTerm | None:
    """RamTorch's CPU-resident Linear weights: the denoiser's (``--ramtorch_transformer_percent``), the
    text encoders' with ``--ramtorch_text_encoder``, the VAE mid block's with ``--ramtorch_vae``."""
    if not config.ramtorch:
        return None
    element = training_bytes(settings)
    targets = list(config.ramtorch_target_modules or []) or None
    nbytes = _linear_bytes(inventory.denoiser, targets, config.ramtorch_transformer_percent or 100, element)
    if config.ramtorch_text_encoder:
        nbytes += sum(_linear_bytes(component, None, config.ramtorch_text_encoder_percent or 100, element)
                      for component in inventory.text_encoders().values())
    vae = inventory.components.get("vae")
    if config.ramtorch_vae and vae is not None:
        nbytes += _linear_bytes(vae, None, 100, element, prefix="encoder.mid_block")
        nbytes += _linear_bytes(vae, None, 100, element, prefix="decoder.mid_block")
    return HostTerm("RamTorch layers", nbytes, "--ramtorch", AFTER_LOAD)


def trainable_parameters(inventory, settings) -> tuple[int, int]:
    """(trainable parameters, bytes per parameter): LoRA adapters train in fp32, full training in the weight dtype."""
    from simpletuner.memory.planner import lora_parameters

    if settings.model_type == "lora":
        return lora_parameters(inventory.denoiser, settings.lora_targets, settings.lora_rank), 4
    return inventory.denoiser.parameters, training_bytes(settings)


def ema_on_cpu(inventory, settings, config) -> list[HostTerm]:
    """``--use_ema`` with ``--ema_device cpu``: the average of the trainable weights in CPU memory;
    ``--ema_cpu_only`` also copies the live weights to the CPU for every update."""
    if not settings.use_ema or (config.ema_device or "cpu") != "cpu":
        return []
    count, element = trainable_parameters(inventory, settings)
    terms = [HostTerm("EMA weights", count * element, "--use_ema --ema_device cpu", ("training", "saving"))]
    if config.ema_cpu_only:
        terms.append(HostTerm("EMA update copy of the weights", count * element, "--ema_cpu_only", ("training",)))
    return terms


def deepspeed_offload(inventory, settings, config, shards: int) -> list[HostTerm]:
    """ZeRO-Offload from ``--deepspeed_config``: this rank's slice of the fp32 master weights, gradients and
    optimizer state (``offload_optimizer``) and of the weights (``offload_param``, stage 3) on the CPU."""
    from simpletuner.memory.planner import optimizer_state_bytes

    try:
        from simpletuner.training.deepspeed import user_deepspeed_config, uses_deepspeed

        if not uses_deepspeed(config):
            return []
        zero = user_deepspeed_config(config).get("zero_optimization") or {}
    except (ValueError, OSError):  # validation reports a bad config
        return []

    def offloaded(key: str) -> bool:
        section = zero.get(key)
        return isinstance(section, dict) and str(section.get("device", "none")).lower() == "cpu"

    count, element = trainable_parameters(inventory, settings)
    terms = []
    if offloaded("offload_optimizer"):
        per_parameter = 4 + 4 + optimizer_state_bytes(settings.optimizer, 4)  # fp32 master, gradient, state
        terms.append(HostTerm("optimizer state + fp32 master (ZeRO)", count * per_parameter / shards,
                              "--deepspeed_config offload_optimizer", ("training", "saving")))
    if offloaded("offload_param"):
        terms.append(HostTerm("weights offloaded (ZeRO-3)", inventory.denoiser.parameters * training_bytes(settings)
                              / shards, "--deepspeed_config offload_param", AFTER_LOAD))
    return terms


def text_width(inventory) -> int:
    """Width of the text embeddings the denoiser takes (its cross-attention input)."""
    config = inventory.denoiser.config
    for key in ("joint_attention_dim", "cross_attention_dim", "caption_channels", "text_embed_dim"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 768


def entry_bytes(inventory, settings) -> tuple[float, float]:
    """(one image's latent cache entry, one caption's text cache entry) in bytes: the posterior's mean and
    spread in fp32, and the prompt embeddings in the weight dtype."""
    from simpletuner.memory.planner import latent_frames, latent_grid

    channels, height, width = latent_grid(inventory, settings.width, settings.height)
    latent = 2 * channels * height * width * latent_frames(inventory, settings.frames) * 4
    text = settings.text_tokens * text_width(inventory) * training_bytes(settings)
    return float(latent), float(text)


def dataset_images(dataset_plan) -> int | None:
    """Pictures in the enabled local datasets (a directory listing; None when a dataset is remote or absent)."""
    if dataset_plan is None:
        return None
    total = 0
    for dataset in dataset_plan.enabled_images:
        folder = getattr(dataset, "instance_data_dir", None)
        if not folder or "://" in str(folder) or not os.path.isdir(folder):
            return None
        for _, _, files in os.walk(folder):
            total += sum(1 for name in files if name.lower().endswith(IMAGE_SUFFIXES))
    return total


def cache_in_ram(inventory, settings, dataset_plan) -> HostTerm:
    """Cache entries kept in RAM after their first read, up to the fixed budget of TensorMemory."""
    latent, text = entry_bytes(inventory, settings)
    images = dataset_images(dataset_plan)
    nbytes = TENSOR_MEMORY_BUDGET_BYTES if images is None else min(TENSOR_MEMORY_BUDGET_BYTES, images * (latent + text))
    label = "cache entries in RAM" + ("" if images is None else f" ({images} images)")
    return HostTerm(label, nbytes, "(latent/text caches, at most 2 GiB)", ("caching", "training"))


def prefetch_queue(inventory, settings, config) -> HostTerm | None:
    """``--dataloader_prefetch``: batches prepared ahead by the prefetch thread."""
    if not config.dataloader_prefetch:
        return None
    depth = int(config.dataloader_prefetch_qlen or 10)
    latent, text = entry_bytes(inventory, settings)
    return HostTerm(f"prefetched batches ({depth} x batch {settings.batch_size})",
                    depth * settings.batch_size * (latent + text), "--dataloader_prefetch_qlen", ("training",))


def decode_ahead(settings, config) -> HostTerm:
    """Images decoded and resized ahead of the VAE while the latent cache is built (float32 pixels)."""
    ahead = int(config.image_processing_batch_size or 2 * settings.vae_batch_size)
    pixels = 3 * settings.width * settings.height * max(settings.frames, 1) * 4
    return HostTerm(f"images decoded ahead ({ahead})", ahead * pixels, "--image_processing_batch_size", ("caching",))


def checkpoint_write(inventory, settings, config) -> list[HostTerm]:
    """A checkpoint write: safetensors serializes the trained weights in memory; ``--offload_during_save``
    moves the denoiser to the CPU first; FSDP gathers the full optimizer state on the main process."""
    from simpletuner.memory.planner import optimizer_state_bytes

    count, element = trainable_parameters(inventory, settings)
    terms = [HostTerm("trained weights serialized", count * element, "(checkpoints, final save)", ("saving",))]
    if config.offload_during_save:
        terms.append(HostTerm("denoiser moved for saving", inventory.denoiser.parameters * training_bytes(settings),
                              "--offload_during_save", ("saving",)))
    if config.fsdp_enable and int(config.num_processes or 1) > 1:
        gathered = count * optimizer_state_bytes(settings.optimizer, element)
        terms.append(HostTerm("full optimizer state gathered", gathered, "--fsdp_enable (main process)", ("saving",),
                              main_only=True))
    return terms


def host_terms(inventory, settings, config, dataset_plan=None, shards: int = 1) -> list[HostTerm]:
    """Every host term of one process for ``settings`` / ``config`` (zero-sized ones included)."""
    terms = [HostTerm("process baseline", PROCESS_BASELINE_BYTES, "(every process)", PHASES),
             *loaded_weights(inventory, config)]
    for term in (quantization_copy(inventory, settings, config), swapped_blocks(inventory, settings, config),
                 offloaded_components(inventory, settings, config), startup_parking(inventory, settings),
                 ramtorch_layers(inventory, settings, config)):
        if term is not None:
            terms.append(term)
    terms += ema_on_cpu(inventory, settings, config)
    terms += deepspeed_offload(inventory, settings, config, shards)
    terms.append(cache_in_ram(inventory, settings, dataset_plan))
    prefetch = prefetch_queue(inventory, settings, config)
    if prefetch is not None:
        terms.append(prefetch)
    terms.append(decode_ahead(settings, config))
    terms += checkpoint_write(inventory, settings, config)
    return terms


def plan_host(inventory, settings, config, dataset_plan=None, shards: int = 1,
              ram: int | None = None, machines: int = 1) -> HostPlan:
    """The host plan of a run; ``ram`` (``--host_ram``) replaces the RAM of this machine (planning for another)."""
    plan = HostPlan(host_terms(inventory, settings, config, dataset_plan, shards), processes_on_this_machine(config, machines),
                    ram if ram is not None else machine_ram(),
                    ram_label="--host_ram" if ram is not None else "this machine's RAM")
    if plan.machine_ram and plan.machine_total > plan.machine_ram:
        plan.notes.append("lower it with fewer processes per machine or without the options that park weights on the "
                          "CPU, or add swap space for the load peak")
    if settings.blocks_to_swap and config.musubi_block_swap_device == "cpu":
        plan.notes.append("on CUDA the swapped blocks are pinned (page-locked): the kernel cannot swap them out")
    return plan
