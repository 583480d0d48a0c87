"""The memory planner: what a run needs on the accelerator, and the cheapest options that fit a budget.

Torch-free, so ``--dry-run`` can print it: model sizes come from the model folder's ``config.json``
files and safetensors headers (tensor names, shapes and dtypes; no weights are read), everything else
from the resolved config. An estimate has these parts:

- **weights**: every parameter of the denoiser in its training dtype (``--mixed_precision``) or its
  quantized size (``--base_model_precision``: bits per Linear and Conv2d weight plus scales; every
  preset quantizes both, torchao and bitsandbytes presets their convolutions with optimum-quanto);
  text encoders and the VAE likewise, unless an offload option keeps them off the accelerator during
  training.
- **adapter, gradients, optimizer state**: the trainable parameters (LoRA rank x (in + out) per
  targeted Linear layer, or every denoiser weight for full training), their gradients and the
  optimizer's state per parameter (Adam: two tensors; 8-bit optimizers: two bytes; ...).
- **activations**: what autograd keeps for the backward pass. Per token and per hidden unit each
  architecture keeps a roughly fixed number of bytes per block, so the planner multiplies the number
  of image tokens (and text tokens) by the width and depth read from the config and by a coefficient
  per architecture and mode (LoRA / full, with / without gradient checkpointing) that was measured
  on tiny models of the same diffusers classes with :mod:`simpletuner.memory.measure`
  (``tests/memory/test_planner.py`` re-measures and checks the estimates within 25%).
- **startup**: the peak while caches are built: every component loaded plus a VAE encode.

The training peak is the larger of the forward/backward peak (weights + optimizer state + gradients
that persist between steps + activations) and the optimizer step (weights + optimizer state +
gradients). Block swap takes the swapped blocks' frozen weights off the accelerator except one block
at a time; RamTorch its streamed Linear weights except one layer.

Given ``--memory_budget``, :func:`propose` tries combinations of precision, gradient checkpointing,
text-encoder/VAE offload, block swap and batch size (with gradient accumulation keeping the
effective batch) and returns the one with the smallest expected slowdown that fits.

:func:`describe` adds two sections from their own modules: per-rank numbers when FSDP2 or ZeRO
shard the run (:mod:`simpletuner.memory.sharding`; the budget is then checked per rank) and the host
RAM plan (:mod:`simpletuner.memory.host`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from simpletuner.memory.units import format_size, parse_size
from simpletuner.models.registry import FAMILIES, family_info

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}
#: LoRA targets when the family preset cannot be read without torch: the attention projections,
#: which is every family's default preset.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: Text tokens each family's cached prompt holds when ``--tokenizer_max_length`` is unset: a snapshot of
#: the family table (``PlannerShape.text_tokens`` + ``fixed_text_tokens``); :func:`text_tokens` reads the table.
TEXT_TOKENS = {name: info.planner.fixed_text_tokens + info.planner.text_tokens
               for name, info in FAMILIES.items() if info.planner is not None}
#: Quantized bytes per Linear / Conv2d weight element, scales included (int8: one scale per output row;
#: 4-bit: one scale per group of 64 or so).
QUANTIZED_BYTES = {8: 1.02, 4: 0.55, 2: 0.3}

#: Activation memory, in element-sized units, per element of (batch x tokens x hidden width x
#: blocks), for image tokens and text tokens, by architecture and training mode. With gradient
#: checkpointing the pair is (per element of the checkpointed blocks' inputs, multiple of one
#: block's activations recomputed at a time). Fitted (least squares on relative error) to
#: ``measure_peak`` around real training steps of the tiny models of ``simpletuner.testing`` and of
#: wider/deeper variants of each (fp32, 64-128 px, batch 2-3; activations = peak minus weights,
#: gradients and optimizer state); the worst activation error of the fit was 15%.
#: tests/memory/test_planner.py checks whole-step peaks at other sizes against fresh measurements.
ACTIVATION_COEFFICIENTS: dict[str, dict[str, tuple[float, float]]] = {
    "unet": {"lora": (19.48, 6.2), "lora+checkpointing": (5.27, 0.96),
             "full": (16.61, 7.31), "full+checkpointing": (4.9, 1.07)},
    "flux": {"lora": (22.58, 17.38), "lora+checkpointing": (0.68, 1.87),
             "full": (26.37, 24.61), "full+checkpointing": (0.73, 1.25)},
    "sd3": {"lora": (27.0, 12.22), "lora+checkpointing": (0.63, 1.59),
            "full": (31.5, 22.51), "full+checkpointing": (0.0, 1.46)},
    "pixart": {"lora": (26.48, 5.03), "lora+checkpointing": (0.0, 1.36),
               "full": (25.6, 3.48), "full+checkpointing": (0.34, 1.32)},
}

#: Expected step-time factors of each choice (rough, from the reference trainer's documentation and
#: common experience; used only to rank proposals).
COST = {"gradient_checkpointing": 1.25, "offload_frozen": 1.0, "int8": 1.15, "int4": 1.35, "halve_batch": 1.08,
        "swap_per_block_fraction": 0.6}


# --- what the model folder says ------------------------------------------------------------------


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass
class ComponentInfo:
    """One component folder: its config and the tensors its safetensors files declare."""

    name: str
    config: dict
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    def stored_bytes(self) -> int:
        return sum(t.numel * DTYPE_BYTES.get(t.dtype, 4) for t in self.tensors)

    def linear_weights(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.name.endswith(".weight") and len(t.shape) == 2]

    def conv_weights(self) -> list[TensorInfo]:
        """Weights of 2-D convolutions (out, in, kernel height, kernel width)."""
        return [t for t in self.tensors if t.name.endswith(".weight") and len(t.shape) == 4]


def read_tensor_infos(path: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of a safetensors file's tensors, from its header only (``safe_open``
    reads no weight; the numpy framework keeps torch out of the planner)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        slices = {name: handle.get_slice(name) for name in handle.keys()}
        return [TensorInfo(name, tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()]


def read_component(folder: Path) -> ComponentInfo | None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    info = ComponentInfo(folder.name, json.loads(config_file.read_text(encoding="utf-8")))
    files = sorted(folder.glob("*.safetensors"))
    variant_free = [f for f in files if f.name.count(".") == 1]  # prefer the default variant's files
    for file in variant_free or files:
        info.tensors.extend(read_tensor_infos(file))
    return info


def hub_snapshot(repo_id: str) -> Path | None:
    """The newest cached snapshot folder of a hub model, found without huggingface_hub."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    snapshots = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None


@dataclass
class ModelInventory:
    family: str
    path: str
    components: dict[str, ComponentInfo]

    @property
    def denoiser(self) -> ComponentInfo:
        return self.components.get("transformer") or self.components["unet"]

    def text_encoders(self) -> dict[str, ComponentInfo]:
        return {name: c for name, c in self.components.items() if name.startswith("text_encoder")}

    def blocks(self) -> list[tuple[str, int, int]]:
        """The denoiser's repeated blocks in execution order: ``(name, parameters, stored bytes)``."""
        found: dict[str, list[int]] = {}
        order = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
        for tensor in self.denoiser.tensors:
            match = re.match(r"^(transformer_blocks|single_transformer_blocks|blocks|layers)\.(\d+)\.", tensor.name)
            if match:
                entry = found.setdefault(f"{match.group(1)}.{match.group(2)}", [0, 0])
                entry[0] += tensor.numel
                entry[1] += tensor.numel * DTYPE_BYTES.get(tensor.dtype, 4)
        return sorted(((name, p, b) for name, (p, b) in found.items()),
                      key=lambda item: (order.index(item[0].split(".")[0]), int(item[0].split(".")[1])))


def read_inventory(config) -> ModelInventory:
    """The components of the configured model, from a local folder or the local hub cache."""
    info = family_info(config.model_family)
    path = str(config.pretrained_model_name_or_path or info.flavours[config.model_flavour or info.default_flavour])
    folder = Path(path)
    if not folder.is_dir():
        snapshot = hub_snapshot(path)
        if snapshot is None:
            raise FileNotFoundError(f"the memory planner reads the model's config.json and safetensors headers; {path} "
                                    "is neither a local folder nor in the local Hugging Face cache")
        folder = snapshot
    components = {}
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            component = read_component(child)
            if component is not None and component.tensors:
                components[child.name] = component
    if "unet" not in components and "transformer" not in components:
        raise FileNotFoundError(f"{folder} has no unet/ or transformer/ folder with safetensors weights")
    return ModelInventory(config.model_family, path, components)


# --- the settings an estimate depends on ---------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """The knobs of one estimate (from the config; :func:`propose` varies some of them)."""

    model_type: str
    mixed_precision: str
    base_model_precision: str
    text_encoder_precisions: tuple[str, ...]
    lora_rank: int
    lora_targets: tuple[str, ...]
    batch_size: int
    gradient_accumulation: int
    width: int
    height: int
    gradient_checkpointing: bool
    blocks_to_swap: int
    offload_frozen: bool  # text encoders and VAE off the accelerator while training
    offload_during_startup: bool
    optimizer: str
    set_grads_to_none: bool
    train_text_encoder: bool
    vae_batch_size: int
    text_tokens: int
    use_ema: bool
    ema_on_cpu: bool
    frames: int = 1  # the longest clip of a video dataset (1 for images)
    ramtorch_percent: int = 0  # --ramtorch: share of the matching Linear layers streamed (0: off)
    ramtorch_targets: tuple[str, ...] = ()  # --ramtorch_target_modules (empty: every Linear)

    @classmethod
    def from_config(cls, config, dataset_plan=None) -> "PlanSettings":
        from simpletuner.options.adapter_rules import parse_target_modules

        targets = DEFAULT_LORA_TARGETS
        if config.peft_lora_target_modules:
            try:
                targets = tuple(parse_target_modules(config.peft_lora_target_modules))
            except Exception:  # validation reports a bad value; the planner keeps the default
                targets = DEFAULT_LORA_TARGETS
        edge = training_edge(config, dataset_plan)
        encoder_precisions = tuple(getattr(config, f"text_encoder_{n}_precision") or "no_change"
                                   for n in range(1, 5))
        return cls(
            model_type=config.model_type, mixed_precision=config.mixed_precision or "no",
            base_model_precision=config.base_model_precision or "no_change",
            text_encoder_precisions=encoder_precisions, lora_rank=int(config.lora_rank or 16), lora_targets=targets,
            batch_size=int(config.train_batch_size or 1), gradient_accumulation=int(config.gradient_accumulation_steps or 1),
            width=edge, height=edge, gradient_checkpointing=bool(config.gradient_checkpointing),
            blocks_to_swap=int(config.musubi_blocks_to_swap or 0),
            offload_frozen=bool(config.enable_model_cpu_offload or config.enable_group_offload),
            offload_during_startup=bool(config.offload_during_startup), optimizer=config.optimizer or "adamw_bf16",
            set_grads_to_none=bool(config.set_grads_to_none), train_text_encoder=bool(config.train_text_encoder),
            vae_batch_size=int(config.vae_batch_size or 4),
            text_tokens=text_tokens(config),
            use_ema=bool(config.use_ema), ema_on_cpu=bool(config.ema_cpu_only or config.ema_device == "cpu"),
            frames=training_frames(config, dataset_plan),
            ramtorch_percent=int(config.ramtorch_transformer_percent or 100) if config.ramtorch else 0,
            ramtorch_targets=tuple(config.ramtorch_target_modules or ()),
        )


def training_frames(config, dataset_plan=None) -> int:
    """Frames of the longest clip any enabled video dataset trains (1 without video datasets)."""
    from simpletuner.data.settings import resolve_dataset

    frames = [resolve_dataset(dataset, config).video.num_frames for dataset in
              (dataset_plan.enabled_images if dataset_plan is not None else ()) if dataset.dataset_type == "video"]
    return int(max(frames, default=1))


def training_edge(config, dataset_plan=None) -> int:
    """The largest square edge (px) any enabled dataset trains at (its own resolution or the global one).

    ``dataset_plan`` is the run's checked dataset list; without one (a library caller) the list is read
    here, and a list that cannot be read leaves the global resolution.
    """
    from simpletuner.data.buckets import pixel_edge
    from simpletuner.data.config import load_dataset_plan
    from simpletuner.data.settings import resolve_dataset
    from simpletuner.options import ConfigError

    edges = []
    if dataset_plan is None and config.data_backend_config:
        try:
            dataset_plan = load_dataset_plan(config.data_backend_config)
        except (ConfigError, OSError, ValueError):  # no readable dataset list: the global resolution
            dataset_plan = None
    for dataset in dataset_plan.enabled_images if dataset_plan is not None else ():
        dataset = resolve_dataset(dataset, config)
        edges.append(pixel_edge(dataset.resolution, dataset.resolution_type))
    if not edges and config.resolution:
        edges.append(pixel_edge(config.resolution, config.resolution_type or "pixel"))
    return int(max(edges, default=1024))


def text_tokens(config) -> int:
    """Text tokens per cached prompt: ``--tokenizer_max_length`` or the family's default, plus the
    tokens the family always adds (SD3 joins 77 CLIP tokens to its T5 tokens); 77 for a family the
    table has no planner shape for."""
    info = FAMILIES.get(config.model_family or "")
    shape = info.planner if info is not None else None
    if shape is None:
        return int(config.tokenizer_max_length or 77)
    return shape.fixed_text_tokens + int(config.tokenizer_max_length or shape.text_tokens)


def _precision_bits(precision: str) -> int | None:
    from simpletuner.options.quantization_rules import PRESETS

    preset = PRESETS.get(precision)
    return preset.bits if preset is not None else None


def optimizer_state_bytes(optimizer: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter, in bytes."""
    name = optimizer.lower()
    if "4bit" in name:
        return 1.0
    if "8bit" in name or "fp8" in name:
        return 3.0 if "ademamix" in name else 2.0
    if "prodigy" in name or "adan" in name:
        return 4 * param_bytes
    if "ranger" in name or "ademamix" in name:
        return 3 * param_bytes
    if "lion" in name or "sgd" in name or "adagrad" in name:
        return 1 * param_bytes
    return 2 * param_bytes  # Adam and friends: two moments


# --- activations ---------------------------------------------------------------------------------


def architecture(inventory: ModelInventory) -> str:
    """Which fitted activation coefficients apply: the ``activation_kind`` the family table gives the
    denoiser's class (``PlannerShape``), else ``unet`` or ``transformer`` by the class name."""
    shape = planner_shape(inventory)
    if shape is not None:
        return shape.activation_kind
    return "unet" if "UNet" in inventory.denoiser.config.get("_class_name", "") else "transformer"


def planner_shape(inventory: ModelInventory):
    """The family table's :class:`~simpletuner.models.registry.PlannerShape` for the inventory's denoiser
    class; None for a class no registered family uses."""
    name = inventory.denoiser.config.get("_class_name", "")
    return next((info.planner for info in FAMILIES.values()
                 if info.planner is not None and info.planner.denoiser_class == name), None)


def latent_grid(inventory: ModelInventory, width: int, height: int) -> tuple[int, int, int]:
    """(latent channels, latent height, latent width) of one image."""
    vae = inventory.components.get("vae")
    if vae is None:  # pixel space
        return 3, height, width
    if "scale_factor_spatial" in vae.config:  # a video VAE (Wan) states its compression
        scale = int(vae.config["scale_factor_spatial"])
        return int(vae.config.get("z_dim", 16)), height // scale, width // scale
    stages = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")  # AutoencoderDC
    scale = 2 ** (len(stages or [1, 1, 1, 1]) - 1)
    return int(vae.config.get("latent_channels", 4)), height // scale, width // scale


def latent_frames(inventory: ModelInventory, frames: int) -> int:
    """Latent frames of a clip of ``frames`` frames (1 for images and image VAEs)."""
    vae = inventory.components.get("vae")
    step = int(vae.config.get("scale_factor_temporal", 0) or 0) if vae is not None else 0
    return 1 + (frames - 1) // step if step else 1


@dataclass(frozen=True)
class ActivationShape:
    """Element counts per sample that the activation coefficients multiply, from the denoiser's
    config: image tokens x width x blocks, text tokens x width x blocks, the checkpointed blocks'
    inputs, and how many checkpointed units there are."""

    image: float
    text: float
    inputs: float
    units: int


def activation_shape(inventory: ModelInventory, settings: PlanSettings) -> ActivationShape:
    config = inventory.denoiser.config
    channels, lat_h, lat_w = latent_grid(inventory, settings.width, settings.height)
    kind = architecture(inventory)
    if kind == "unet":
        widths = list(config.get("block_out_channels", [320, 640, 1280, 1280]))
        per_block = config.get("layers_per_block", 2)
        per_block = per_block if isinstance(per_block, list) else [per_block] * len(widths)
        transformer_layers = config.get("transformer_layers_per_block", 1)
        transformer_layers = transformer_layers if isinstance(transformer_layers, list) else [transformer_layers] * len(widths)
        down_types = config.get("down_block_types", [])
        attention = ["CrossAttn" in (down_types[level] if level < len(down_types) else "") for level in range(len(widths))]
        # LoRA adapts attention only: nothing before the first attention block needs a gradient
        first = attention.index(True) if settings.model_type == "lora" and True in attention else 0
        image = text = inputs = 0.0
        units = 3  # the mid block: two resnets and an attention
        for level, width in enumerate(widths):
            units += (2 * per_block[level] + 1) * (2 if attention[level] else 1)
            cells = (lat_h >> level) * (lat_w >> level)
            extra = transformer_layers[level] if attention[level] else 0
            down = per_block[level] * (1 + extra) if level >= first else 0
            up = (per_block[level] + 1) * (1 + extra)
            image += cells * width * (down + up)
            inputs += cells * width * (per_block[level] * (level >= first) + per_block[level] + 1) * (2 if extra else 1)
            if extra:
                text += settings.text_tokens * width * (per_block[level] * (level >= first) + per_block[level] + 1) * extra
        lowest = len(widths) - 1
        cells = (lat_h >> lowest) * (lat_w >> lowest)
        image += cells * widths[lowest] * (2 + transformer_layers[lowest])  # the mid block
        return ActivationShape(image, text, inputs, units)
    patch = config.get("patch_size", 2) or 1
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch)  # video transformers: (t, h, w)
    shape = planner_shape(inventory)
    if shape is not None and shape.token_patch:
        patch = shape.token_patch  # e.g. FLUX packs 2x2 latent cells into one token (its config says patch_size 1)
    depth_keys = shape.block_count_keys if shape is not None else ("num_layers",)
    depth = sum(int(config.get(key) or 0) for key in depth_keys) or 24
    width = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 64)
    tokens = (lat_h // patch) * (lat_w // patch) * latent_frames(inventory, settings.frames)
    return ActivationShape(tokens * width * depth, settings.text_tokens * width * depth,
                           (tokens + settings.text_tokens) * width * depth, depth)


def activation_bytes(inventory: ModelInventory, settings: PlanSettings) -> float:
    kind = architecture(inventory)
    coefficients = ACTIVATION_COEFFICIENTS.get(kind) or ACTIVATION_COEFFICIENTS["flux" if kind != "unet" else "unet"]
    mode = "full" if settings.model_type == "full" else "lora"
    image_coefficient, text_coefficient = coefficients[mode]
    shape = activation_shape(inventory, settings)
    element = 2 if settings.mixed_precision in ("bf16", "fp16") else 4
    everything = image_coefficient * shape.image + text_coefficient * shape.text
    if settings.gradient_checkpointing:
        per_input, recomputed_blocks = coefficients[mode + "+checkpointing"]
        everything = per_input * shape.inputs + recomputed_blocks * everything / max(shape.units, 1)
    return settings.batch_size * element * everything


# --- the estimate --------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes on the accelerator, by part; ``training_peak`` and ``startup_peak`` are the totals."""

    parts: dict[str, float]
    training_peak: float
    startup_peak: float
    settings: PlanSettings
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.startup_peak)

    def table(self) -> list[str]:
        lines = [f"  {name:<28} {format_size(value):>12}" for name, value in self.parts.items() if value]
        lines.append(f"  {'training peak':<28} {format_size(self.training_peak):>12}")
        lines.append(f"  {'startup peak (caching)':<28} {format_size(self.startup_peak):>12}")
        return lines


def _weights(component: ComponentInfo, precision: str, training_bytes: int) -> float:
    bits = _precision_bits(precision)
    if bits is None:
        return component.parameters * training_bytes
    # every preset quantizes Linear and Conv2d weights (torchao / bitsandbytes presets their convolutions
    # with optimum-quanto, simpletuner/models/quantize.py); norms, biases and embeddings keep their type
    quantized = sum(t.numel for t in (*component.linear_weights(), *component.conv_weights()))
    return quantized * QUANTIZED_BYTES[bits] + (component.parameters - quantized) * training_bytes


def _ramtorch_streamed(denoiser: ComponentInfo, settings: PlanSettings, element: int, notes: list[str]) -> float:
    """Bytes of the denoiser's weights RamTorch keeps in CPU memory instead: the streamed Linear weights,
    less the largest one (one layer at a time visits the accelerator). The host plan counts them."""
    if not settings.ramtorch_percent:
        return 0.0
    from simpletuner.memory.host import streamed_linear_weights

    streamed = streamed_linear_weights(denoiser, list(settings.ramtorch_targets) or None, settings.ramtorch_percent)
    if not streamed:
        return 0.0
    total = sum(t.numel for t in streamed) * element
    notes.append(f"RamTorch: {len(streamed)} Linear weights ({format_size(total)}) wait in CPU memory")
    return total - max(t.numel for t in streamed) * element


def lora_parameters(component: ComponentInfo, targets: tuple[str, ...], rank: int) -> int:
    count = 0
    for tensor in component.linear_weights():
        module = tensor.name[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in targets):
            out_features, in_features = tensor.shape
            count += rank * (in_features + out_features)
    return count


def estimate(inventory: ModelInventory, settings: PlanSettings) -> MemoryEstimate:
    """Accelerator bytes a run with ``settings`` needs (see the module docstring)."""
    training_bytes = 2 if settings.mixed_precision in ("bf16", "fp16") else 4
    denoiser = inventory.denoiser
    parts: dict[str, float] = {}
    notes: list[str] = []
    denoiser_weights = _weights(denoiser, settings.base_model_precision, training_bytes)
    swapped = 0.0
    if settings.blocks_to_swap:
        blocks = inventory.blocks()[-settings.blocks_to_swap:]
        per_block = [p * training_bytes for _, p, _ in blocks]
        swapped = sum(per_block) - max(per_block, default=0)  # one block at a time visits the accelerator
        notes.append(f"block swap: {len(blocks)} blocks ({format_size(sum(per_block))}) wait in CPU memory")
    parts["denoiser weights"] = denoiser_weights - swapped - _ramtorch_streamed(denoiser, settings, training_bytes, notes)
    encoders = inventory.text_encoders()
    encoder_weights = sum(_weights(c, settings.text_encoder_precisions[index] if index < 4 else "no_change", training_bytes)
                          for index, c in enumerate(encoders.values()))
    vae = inventory.components.get("vae")
    vae_weights = vae.parameters * 4 if vae is not None else 0.0  # the VAE stays fp32 below bf16
    if vae is not None and training_bytes == 2:
        vae_weights = vae.parameters * 2
    frozen_resident = not settings.offload_frozen or settings.train_text_encoder
    parts["text encoders"] = encoder_weights if frozen_resident else 0.0
    parts["vae"] = vae_weights if not settings.offload_frozen else 0.0
    if settings.model_type == "lora":
        trainable = lora_parameters(denoiser, settings.lora_targets, settings.lora_rank)
        parts["adapter weights"] = trainable * 4  # adapters train in fp32
        trainable_bytes = 4
    else:
        trainable = denoiser.parameters
        trainable_bytes = training_bytes
    if settings.train_text_encoder:
        # only the encoders the family trains (SD3's and FLUX's T5 stays frozen)
        info = FAMILIES.get(inventory.family)
        trained = {n: c for n, c in encoders.items() if info is None or n in info.text_encoders}
        encoder_params = sum(c.parameters for c in trained.values())
        trainable += (sum(lora_parameters(c, ("q_proj", "k_proj", "v_proj", "out_proj"), settings.lora_rank)
                          for c in trained.values()) if settings.model_type == "lora" else encoder_params)
    gradients = trainable * trainable_bytes
    optimizer = trainable * optimizer_state_bytes(settings.optimizer, trainable_bytes)
    parts["optimizer state"] = optimizer
    if settings.use_ema and not settings.ema_on_cpu:
        parts["ema weights"] = trainable * trainable_bytes
    activations = activation_bytes(inventory, settings)
    static = sum(parts.values())
    persistent_gradients = 0.0 if settings.set_grads_to_none else gradients
    parts["gradients"] = gradients
    parts["activations"] = activations
    forward_backward = static + persistent_gradients + activations
    optimizer_step = static + gradients + trainable * trainable_bytes  # one temporary per parameter
    training_peak = max(forward_backward, optimizer_step)
    # caching: every component loaded (unless offloaded while the other one works) plus a VAE encode
    largest_feature = 0.0
    if vae is not None:
        widths = vae.config.get("block_out_channels", [128, 256, 512, 512])
        largest_feature = max(w * (settings.height >> i) * (settings.width >> i) for i, w in enumerate(widths))
    vae_encode = settings.vae_batch_size * largest_feature * (vae_weights / max(vae.parameters, 1) if vae else 4) * 3
    caching_components = parts["denoiser weights"] + (max(encoder_weights, vae_weights) if settings.offload_during_startup
                                             or settings.offload_frozen else encoder_weights + vae_weights)
    startup_peak = caching_components + vae_encode
    return MemoryEstimate(parts, training_peak, startup_peak, settings, notes)


# --- proposals -----------------------------------------------------------------------------------


@dataclass
class Proposal:
    """A set of option changes, the estimate with them, and its expected slowdown."""

    changes: dict[str, object]
    estimate: MemoryEstimate
    cost: float

    def flags(self) -> str:
        return " ".join(f"--{name} {str(value).lower() if isinstance(value, bool) else value}"
                        for name, value in self.changes.items()) or "(no changes)"


def _candidates(inventory: ModelInventory, base: PlanSettings, can_swap: bool, precisions: list[str]):
    blocks = len(inventory.blocks()) if can_swap else 0
    batches = sorted({max(1, base.batch_size >> k) for k in range(8)}, reverse=True)
    for precision, checkpointing, offload, batch in itertools.product(
            precisions, sorted({base.gradient_checkpointing, True}), sorted({base.offload_frozen, True}), batches):
        swaps = range(blocks + 1) if precision == "no_change" else [0]
        for swap in swaps:
            yield replace(base, base_model_precision=precision, gradient_checkpointing=checkpointing,
                          offload_frozen=offload, batch_size=batch, blocks_to_swap=swap,
                          gradient_accumulation=base.gradient_accumulation * (base.batch_size // batch))


def _cost(settings: PlanSettings, base: PlanSettings, blocks: int) -> float:
    cost = 1.0
    if settings.gradient_checkpointing and not base.gradient_checkpointing:
        cost *= COST["gradient_checkpointing"]
    bits = _precision_bits(settings.base_model_precision)
    if bits is not None and settings.base_model_precision != base.base_model_precision:
        cost *= COST["int8"] if bits >= 8 else COST["int4"]
    if settings.blocks_to_swap and blocks:
        cost *= 1 + COST["swap_per_block_fraction"] * settings.blocks_to_swap / blocks
    halvings = (base.batch_size // settings.batch_size).bit_length() - 1
    cost *= COST["halve_batch"] ** halvings
    if settings.offload_frozen and not base.offload_frozen:
        cost *= 1.001  # free during training; validation waits for the copies
    return cost


def _changes(settings: PlanSettings, base: PlanSettings) -> dict[str, object]:
    changes: dict[str, object] = {}
    if settings.base_model_precision != base.base_model_precision:
        changes["base_model_precision"] = settings.base_model_precision
    if settings.gradient_checkpointing != base.gradient_checkpointing:
        changes["gradient_checkpointing"] = True
    if settings.offload_frozen != base.offload_frozen:
        changes["enable_model_cpu_offload"] = True
    if settings.blocks_to_swap != base.blocks_to_swap:
        changes["musubi_blocks_to_swap"] = settings.blocks_to_swap
    if settings.batch_size != base.batch_size:
        changes["train_batch_size"] = settings.batch_size
        changes["gradient_accumulation_steps"] = settings.gradient_accumulation
    return changes


def propose(inventory: ModelInventory, base: PlanSettings, budget: int, config=None,
            cuda: bool | None = None) -> Proposal | None:
    """The cheapest :class:`Proposal` whose peak fits ``budget`` bytes (None when nothing does)."""
    from simpletuner.options.adapter_rules import cuda_visible
    from simpletuner.options.quantization_rules import PRESETS

    cuda = cuda_visible() if cuda is None else cuda
    can_swap = (base.model_type == "lora" and architecture(inventory) != "unet"
                and (config is None or (config.num_processes or 1) == 1))
    precisions = [base.base_model_precision]
    if base.base_model_precision == "no_change":
        precisions += [name for name in ("int8-quanto", "int4-quanto") if name in PRESETS]
        if cuda and "nf4-bnb" in PRESETS:
            precisions.append("nf4-bnb")
    blocks = len(inventory.blocks())
    best: Proposal | None = None
    for settings in _candidates(inventory, base, can_swap, precisions):
        result = estimate(inventory, settings)
        if result.peak > budget:
            continue
        cost = _cost(settings, base, blocks)
        changes = _changes(settings, base)
        if best is None or (cost, len(changes)) < (best.cost, len(best.changes)):
            best = Proposal(changes, result, cost)
    return best


# --- the report ----------------------------------------------------------------------------------


def describe(config, budget: str | None = None, dataset_plan=None, host_ram: int | None = None,
             machines: int = 1) -> str:
    """The text ``simpletuner plan-memory`` and ``--dry-run`` print (``dataset_plan``: the run's checked list):
    the accelerator estimate, the per-rank numbers under FSDP2 / ZeRO (memory/sharding.py) and the host
    RAM plan (memory/host.py; ``host_ram`` replaces the RAM of the machine it runs on, ``machines`` is the
    launcher's machine count, over which ``--num_processes`` is spread)."""
    try:
        inventory = read_inventory(config)
    except (FileNotFoundError, OSError, ValueError) as error:
        return f"memory plan: not available ({error})"
    settings = PlanSettings.from_config(config, dataset_plan)
    result = estimate(inventory, settings)
    sizes = ", ".join(f"{name} {c.parameters / 1e6:,.{1 if c.parameters >= 10**6 else 3}f}M"
                      for name, c in inventory.components.items())
    lines = [f"memory plan for {config.model_family} ({inventory.path}; parameters: {sizes})",
             f"  at {settings.width}x{settings.height}, batch {settings.batch_size}, {settings.model_type}"
             + (f" rank {settings.lora_rank}" if settings.model_type == "lora" else "")
             + f", {settings.mixed_precision}, base {settings.base_model_precision}, optimizer {settings.optimizer}"
             + (", gradient checkpointing" if settings.gradient_checkpointing else "")]
    lines += result.table()
    lines += [f"  note: {note}" for note in result.notes]
    from simpletuner.memory.sharding import plan_sharding

    sharding = plan_sharding(result, inventory, config)
    budget = budget if budget is not None else config.memory_budget
    if budget:
        limit = parse_size(budget)
        if result.peak <= limit:
            lines.append(f"  fits in {format_size(limit)} as configured")
        elif sharding is not None and max(sharding.training_peak, result.startup_peak) <= limit:
            lines.append(f"  fits in {format_size(limit)} per rank as configured ({sharding.engine}, see below)")
        else:
            proposal = propose(inventory, settings, limit, config)
            if proposal is None:
                lines.append(f"  does not fit in {format_size(limit)} with any combination the planner tries "
                             "(precision, checkpointing, offload, block swap, batch size)")
            else:
                lines.append(f"  to fit in {format_size(limit)}: {proposal.flags()}")
                lines.append(f"    estimated peak {format_size(proposal.estimate.peak)}, about "
                             f"{proposal.cost:.2f}x the step time")
    if sharding is not None:
        lines += sharding.lines()
    from simpletuner.memory.host import plan_host
    from simpletuner.memory.sharding import shard_degree

    host = plan_host(inventory, settings, config, dataset_plan, shards=shard_degree(config), ram=host_ram,
                     machines=machines)
    lines += host.lines()
    return "\n".join(lines)
