"""Quantized base models: load a family with its denoiser and text encoders quantized.

The trainer calls :func:`load_model` instead of ``model.load()``. Everything goes through the family
contract (``load()``, ``denoiser`` / ``denoiser_name``, ``text_encoder_modules()``), so every family
gets every preset and no family file knows about quantization.

Three ways to quantize (``--quantize_via``):

* ``cpu`` (default): the family loads as usual; each requested component is then moved to the CPU,
  quantized there and moved back. Slow for big models but it never needs more accelerator memory
  than the quantized model.
* ``accelerator``: the same, quantizing where the family put the component (quicker on a GPU; the
  full-precision weights must fit there first).
* ``pipeline``: diffusers / transformers quantize while loading (``quantization_config`` passed to
  ``from_pretrained``, refined per component by ``--quantization_config``), so the full-precision
  weights never sit on the device. Families load every component through
  :meth:`ModelFamily.load_component` naming its role, and while ``load()`` runs the model's loader is
  a :class:`QuantizedLoading` that adds the config for the components being quantized; library
  classes are never patched. A component a family loads some other way (a single-file pipeline
  checkpoint) is quantized right after loading, as with ``cpu``.

Backends: optimum-quanto (``quantize`` + ``freeze``), torchao (``quantize_`` with its config objects)
and bitsandbytes, whose diffusers loader needs a GPU; for ``nf4-bnb`` this module swaps each
``nn.Linear`` for ``bnb.nn.Linear4bit`` itself, which runs forward and backward on the CPU too.
torchao and bitsandbytes quantize Linear layers only (torchao's tensors have no convolution op,
bitsandbytes no 4-bit convolution), so after them the remaining ``nn.Conv2d`` layers (a UNet's
resnets, up/downsamplers, conv_in/out; a patch embedding) are quantized with optimum-quanto at the
preset's precision (``Preset.conv_weights``), by every ``--quantize_via`` route; the loaders'
QuantoConfig quantizes Linear layers only too, so on the pipeline route quanto presets get the same
pass. The quantized convolutions are simpletuner.models.quanto_layers' QConv2d (so PEFT can put a LoRA
on them).

A denoiser stored as a ``.gguf`` file (``--pretrained_transformer_model_name_or_path`` /
``--pretrained_unet_model_name_or_path``, or a pipeline folder whose ``unet/`` or ``transformer/``
holds a ``.gguf`` next to its config.json) is loaded with diffusers' ``GGUFQuantizationConfig``: its
blocks stay quantized and are dequantized layer by layer in the forward pass.

What may be combined on which device is decided at config validation
(simpletuner/options/quantization_rules.py), never here mid-run.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ComponentLoading
from simpletuner.options.quantization_rules import (
    PRESETS,
    TORCHAO_CLASSES,
    Preset,
    component_precisions,
    entry_for,
    gguf_denoiser_file,
    gguf_sources,
    option_for,
    parse_quantization_config,
)

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: diffusers' / transformers' QuantoConfig names for the quanto weight types. diffusers has no
#: e4m3fnuz type; fp8uz-quanto through the pipeline loads e4m3fn (validation warns).
QUANTO_PIPELINE_NAMES = {"qint8": "int8", "qint4": "int4", "qint2": "int2", "qfloat8": "float8",
                         "qfloat8_e4m3fnuz": "float8"}
#: Parameter types of quantized weights that are not traceable tensor subclasses.
QUANTIZED_PARAMETER_TYPES = ("Params4bit", "Int8Params", "GGUFParameter")


class QuantizationError(RuntimeError):
    """A requested quantization that could not be applied; the message names the option."""


# --- entry point ---------------------------------------------------------------------------------------


def load_model(model, config, denoiser_without_weights: bool = False) -> dict[str, str]:
    """``model.load()``, with the components ``config`` asks for quantized; with
    ``denoiser_without_weights`` the denoiser is built from its config on the meta device instead of
    loaded (``--fsdp_cpu_ram_efficient_loading`` on the processes other than the main one).

    Returns what was quantized, component name -> description (also left on ``model.quantization``).
    """
    wanted = component_precisions(config)
    settings = parse_quantization_config(config.quantization_config, wanted) if config.quantization_config else {}
    loading = QuantizedLoading(config, wanted, settings, denoiser_without_weights=denoiser_without_weights)
    previous, model.loading = model.component_loading(), loading
    try:
        model.load()
    finally:
        model.loading = previous  # later loads of this model (e.g. another expert at validation) load plainly
    if config.fuse_qkv_projections:
        # between loading and quantizing: quantized weights cannot be concatenated (models/qkv_fusion.py)
        from simpletuner.models.qkv_fusion import QkvFusion, describe

        fusion = QkvFusion.apply(model.denoiser)
        logger.info("fused the attention projections of the %s: %s", model.denoiser_name,
                    ", ".join(f"{count} x {name}" for name, count in describe(fusion).items()))
    done = dict(loading.done)
    for role, name in wanted.items():
        if role in done:
            continue
        if config.quantize_via == "pipeline":
            logger.info("%s was not loaded through from_pretrained; quantizing it after loading, on the CPU", role)
        module = component_module(model, role)
        dtype = DTYPES.get(config.base_model_default_dtype) if role == "denoiser" else None
        # torchao's int4 packing (mslk) runs on the GPU only, so that preset quantizes where the model is
        via = "accelerator" if config.quantize_via == "accelerator" or name == "int4-torchao" else "cpu"
        quantize_module(module, name, via=via,
                        dtype=dtype, activations=bool(config.quantize_activations) and role == "denoiser",
                        overrides=entry_for(settings, role), **convolution_settings(config))
        done[role] = f"{name} ({config.quantize_via})"
    for role, how in done.items():
        module = component_module(model, role)
        if quantized_layers(module) == 0:
            raise QuantizationError(f"`--{option_for(role)}`: no layer of the {component_label(model, role)} was "
                                    f"quantized ({how}); its layer shapes may not suit the preset")
        module.requires_grad_(False)
        for layer in module.modules():  # loader-made bitsandbytes layers too (see swap_linear_4bit)
            if getattr(layer, "support_avx512bf16_for_cpu", False):
                layer.support_avx512bf16_for_cpu = False
        contiguous_quanto_inputs(module)  # and loader-made quanto layers
        adaptable_quanto_convolutions(module)
        logger.info("%s: %s, %d quantized layers, %.1f MB of weights", component_label(model, role), how,
                    quantized_layers(module), weight_bytes(module) / 2**20)
    labelled = {component_label(model, role): how for role, how in done.items()}
    model.quantization = labelled
    return labelled


def convolution_settings(config) -> dict[str, Any]:
    """How the convolutions a preset's library leaves are quantized with quanto in this run
    (:func:`quantize_convolutions`): held in the autocast type under ``--mixed_precision bf16``
    (quanto's weights cannot be cast by autocast, so an fp32 ``--base_model_default_dtype`` would
    break them), in the module's own type without mixed precision. Under fp16 / fp8 mixed precision
    the model is held in fp32 while autocast computes in another type and validation runs without
    autocast, which no fixed quanto type survives: the convolutions are left unquantized."""
    precision = config.mixed_precision or "no"
    if precision == "bf16":
        return {"convolutions": True, "conv_dtype": torch.bfloat16}
    return {"convolutions": precision == "no", "conv_dtype": None}


def component_module(model, role: str) -> torch.nn.Module:
    if role == "denoiser":
        return model.denoiser
    encoders = text_encoders_of(model)
    if role not in encoders:
        raise QuantizationError(f"`--{option_for(role)}`: the {model.family} model has no {role} "
                                f"(its text encoders: {', '.join(encoders) or 'none'}); remove the option")
    return encoders[role]


def component_label(model, role: str) -> str:
    return model.denoiser_name if role == "denoiser" else role


def text_encoders_of(model) -> dict[str, torch.nn.Module]:
    method = getattr(model, "text_encoder_modules", None)
    if callable(method):
        return dict(method())
    return {name: module for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
            if isinstance(module := getattr(model, name, None), torch.nn.Module)}


# --- quantizing a loaded module --------------------------------------------------------------------------


def quantize_module(module: torch.nn.Module, preset_name: str, via: str = "cpu", dtype: torch.dtype | None = None,
                    activations: bool = False, overrides: dict[str, Any] | None = None, convolutions: bool = True,
                    conv_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Quantize ``module`` in place with a preset; it ends up frozen on the device it started on.

    ``via="cpu"`` moves it to the CPU for quantizing; ``dtype`` first casts the weights the quantizer
    leaves alone (``--base_model_default_dtype``); ``activations`` picks the preset's variant with
    quantized activations (torchao only; validation refuses the others). For torchao and
    bitsandbytes presets the ``nn.Conv2d`` layers are then quantized with optimum-quanto
    (:func:`quantize_convolutions`; ``convolutions=False`` leaves them, ``conv_dtype`` is the type
    they are held and compute in).
    """
    preset = PRESETS[preset_name]
    overrides = dict(overrides or {})
    home = next((p.device for p in module.parameters()), torch.device("cpu"))
    work = torch.device("cpu") if via == "cpu" else home
    if dtype is not None:
        module.to(dtype=dtype)
    module.to(work)
    module.requires_grad_(False)
    if preset.backend == "quanto":
        from optimum import quanto

        quanto.quantize(module, weights=getattr(quanto, preset.weights),
                        exclude=overrides.get("modules_to_not_convert"))
        quanto.freeze(module)
        contiguous_quanto_inputs(module)
        adaptable_quanto_convolutions(module)
    elif preset.backend == "torchao":
        from torchao.quantization import quantize_

        skip = tuple(overrides.get("modules_to_not_convert") or ())
        quantize_(module, torchao_config(preset, activations, overrides.get("quant_type")),
                  filter_fn=lambda layer, name: isinstance(layer, torch.nn.Linear) and not _skipped(name, skip))
    elif preset.backend == "bnb":
        swap_linear_4bit(module, quant_type=preset.weights, compute_dtype=_module_dtype(module),
                         skip=tuple(overrides.get("llm_int8_skip_modules") or ()))
    else:  # pragma: no cover - PRESETS lists every backend
        raise QuantizationError(f"unknown quantization backend {preset.backend!r}")
    if convolutions and preset.conv_weights:
        quantize_convolutions(module, preset.conv_weights, skip=skip_list(preset, overrides), dtype=conv_dtype,
                              why=CONV_REASONS[preset.backend])
    elif preset.conv_weights:
        _convolutions_left(module, preset.backend)
    module.to(work)  # bitsandbytes quantizes when its parameters are moved to a device
    module.to(home)
    return module


def skip_list(preset: Preset, overrides: dict[str, Any]) -> tuple[str, ...]:
    """The ``--quantization_config`` modules a preset's backend leaves unquantized."""
    key = "llm_int8_skip_modules" if preset.backend == "bnb" else "modules_to_not_convert"
    return tuple(overrides.get(key) or ())


def quantize_convolutions(module: torch.nn.Module, weights: str, skip: tuple[str, ...] = (),
                          dtype: torch.dtype | None = None, why: str = "") -> int:
    """Quantize the plain ``nn.Conv2d`` layers of ``module`` with optimum-quanto weight type ``weights``
    (``qint8``, ``qint4``, ...), frozen: the convolutions of a preset whose library quantizes Linear
    layers only (``Preset.conv_weights``), or that diffusers' loader left (``--quantize_via pipeline``).

    Layers named in ``skip`` (or ending in ``.`` + a name in it, as for the Linear pass) stay as they
    are; ``dtype`` casts the convolutions first (quanto's layers compute in the type they hold). The
    layers become :class:`~simpletuner.models.quanto_layers.QConv2d`. Returns how many were
    quantized, and logs it with their share of the module's weights and ``why`` it was done here.
    """
    names = [name for name, layer in module.named_modules()
             if type(layer) is torch.nn.Conv2d and not _skipped(name, skip)]
    if not names:
        return 0
    from optimum import quanto

    from simpletuner.models.quanto_layers import QConv2d

    layers = [module.get_submodule(name) for name in names]
    share = sum(layer.weight.numel() for layer in layers) / max(sum(map(logical_numel, module.parameters())), 1)
    if dtype is not None:
        for layer in layers:
            layer.to(dtype=dtype)
    # quanto matches ``include`` with fnmatch: the exact names, escaped, select these layers and nothing
    # else (torchao's linears are nn.Linear and bitsandbytes' Linear4bit subclasses it, which quanto
    # would otherwise replace as well)
    quanto.quantize(module, weights=getattr(quanto, weights), include=[glob.escape(name) for name in names])
    for name in names:
        layer = module.get_submodule(name)
        layer.freeze()
        layer.requires_grad_(False)
        layer.__class__ = QConv2d  # PEFT builds LoRA factors from the layer's class: see quanto_layers
    logger.info("%d convolutions (%.1f%% of the weights) quantized with optimum-quanto %s%s", len(names),
                100 * share, weights, f": {why}" if why else "")
    return len(names)


def _convolutions_left(module: torch.nn.Module, backend: str) -> None:
    count = sum(1 for layer in module.modules() if type(layer) is torch.nn.Conv2d)
    if count:
        logger.info("%d convolutions left unquantized (%s; optimum-quanto's weights cannot follow autocast "
                    "under this --mixed_precision)", count, CONV_REASONS[backend])


#: Why :func:`quantize_convolutions` runs, by backend: what the library cannot do.
CONV_REASONS = {"torchao": "torchao has no quantized convolution",
                "bnb": "bitsandbytes has no quantized convolution",
                "quanto": "the loader's QuantoConfig quantizes Linear layers only"}


def contiguous_quanto_inputs(module: torch.nn.Module) -> int:
    """Give quanto's linear layers contiguous inputs.

    quanto's int8 CPU kernel (``torch._weight_int8pack_mm``) rejects an input that is not contiguous
    in its last dimension, which is what a UNet with ``use_linear_projection`` (SDXL's) hands its
    ``proj_in`` after a permute. Returns how many layers got the pre-hook."""
    count = 0
    for layer in module.modules():
        if type(layer).__name__ == "QLinear" and not getattr(layer, "_contiguous_inputs", False):
            layer.register_forward_pre_hook(_make_contiguous)
            layer._contiguous_inputs = True
            count += 1
    return count


def adaptable_quanto_convolutions(module: torch.nn.Module) -> int:
    """Make quanto's convolutions simpletuner's :class:`~simpletuner.models.quanto_layers.QConv2d`, on
    which PEFT builds a LoRA's factors as plain convolutions (see that module). Returns how many."""
    layers = [layer for layer in module.modules()
              if type(layer).__name__ == "QConv2d" and type(layer).__module__.startswith("optimum.quanto")]
    if layers:
        from simpletuner.models.quanto_layers import QConv2d

        for layer in layers:
            layer.__class__ = QConv2d
    return len(layers)


def _make_contiguous(layer, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def torchao_config(preset: Preset, activations: bool, kwargs: dict[str, Any] | None = None):
    """The torchao config object of a preset (current config-object API: ``quantize_(m, Config())``)."""
    import torchao.quantization as ao

    name = TORCHAO_CLASSES[(preset.weights, activations)]
    try:
        return getattr(ao, name)(**(kwargs or {}))
    except TypeError as error:
        raise QuantizationError(f"`--quantization_config` quant_type {kwargs!r} does not fit torchao's {name}: "
                                f"{error}") from None


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def swap_linear_4bit(module: torch.nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                     skip: tuple[str, ...] = ()) -> int:
    """Replace every plain ``nn.Linear`` by bitsandbytes' ``Linear4bit`` holding the same weights.

    The weights are quantized when the module is next moved to a device (``module.to(...)``), on
    that device; returns how many layers were swapped.
    """
    import bitsandbytes as bnb

    count = 0
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not torch.nn.Linear or _skipped(full_name, skip):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quant_type, device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant_type,
                                             module=layer)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            # bitsandbytes repacks a CPU layer's weight for its inference kernel the first time it runs in
            # eval mode without gradients (a validation pass), and that kernel then fails in backward
            # (an in-place bias add on a tensor that needs grad): keep the trainable layout.
            layer.support_avx512bf16_for_cpu = False
            layer.train(child.training)
            setattr(parent, name, layer)
            count += 1
    return count


# --- measuring ------------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: the inner tensors of a tensor subclass (quanto,
    torchao), plus the block statistics of a bitsandbytes 4-bit weight."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(inner) for name in names if isinstance(inner := getattr(tensor, name), torch.Tensor))
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    while state is not None:  # bitsandbytes: absmax (itself quantized with double quantization) and the code
        total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset)
                     if isinstance(t, torch.Tensor))
        state = getattr(state, "state2", None)
    return total


def logical_numel(tensor: torch.Tensor) -> int:
    """Elements of the weight a tensor stands for (a packed bitsandbytes 4-bit weight holds two per byte)."""
    state = getattr(tensor, "quant_state", None)
    return state.shape.numel() if state is not None and getattr(state, "shape", None) is not None else tensor.numel()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, quantized ones counted as stored."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


#: The parts :func:`weight_breakdown` splits a layer's bytes into.
BREAKDOWN_PARTS = ("quantized data", "scales and offsets", "unquantized weights", "biases", "buffers")


def layer_kind(layer: torch.nn.Module) -> str:
    """The family a layer belongs to for :func:`weight_breakdown`, whatever library replaced it:
    quanto's ``QLinear`` and bitsandbytes' ``Linear4bit`` are ``Linear``, quanto's ``QConv2d`` is
    ``Conv2d``, every normalization is ``norm``; anything else keeps its class name."""
    name = type(layer).__name__
    if isinstance(layer, torch.nn.Linear) or name in ("QLinear", "Linear4bit", "Linear8bitLt"):
        return "Linear"
    if isinstance(layer, torch.nn.Conv2d) or name == "QConv2d":
        return "Conv2d"
    if "Norm" in name:
        return "norm"
    if isinstance(layer, torch.nn.Embedding):
        return "Embedding"
    return name


def split_tensor_bytes(tensor: torch.Tensor) -> tuple[int, int]:
    """(packed data, scales and offsets) bytes of a quantized tensor: the integer inner tensors of a
    quanto / torchao tensor are the data, the rest (scales, shifts, zero points) the overhead; for a
    bitsandbytes 4-bit weight the packed bytes are the data and its block statistics the overhead."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        data = overhead = 0
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if not isinstance(inner, torch.Tensor):
                continue
            if is_traceable_wrapper_subclass(inner):  # quanto's packed int4 / int2 data
                inner_data, inner_overhead = split_tensor_bytes(inner)
                data, overhead = data + inner_data, overhead + inner_overhead
            elif inner.is_floating_point() and "data" not in name:
                overhead += tensor_bytes(inner)
            elif "zero" in name:  # torchao's zero points are integers, but overhead all the same
                overhead += tensor_bytes(inner)
            else:
                data += tensor_bytes(inner)
        return data, overhead
    data = tensor.numel() * tensor.element_size()
    return data, tensor_bytes(tensor) - data


def weight_breakdown(module: torch.nn.Module) -> dict[tuple[str, str], int]:
    """Where a module's weight bytes go: (layer kind, part) -> bytes, summing to :func:`weight_bytes`.

    Why: a preset's saving is capped by what it leaves in high precision (norms, biases, embeddings,
    layers it skips) and by the scales it adds; this names each, so a missed memory target points at
    its cause. Parts are :data:`BREAKDOWN_PARTS`: the packed data and the scales of quantized weights,
    weights left unquantized, biases, and buffers (quanto's activation scales, fixed position
    embeddings). Each tensor is counted once, with the first layer that holds it."""
    seen: set[int] = set()
    totals: dict[tuple[str, str], int] = {}

    def add(kind: str, part: str, count: int) -> None:
        if count:
            totals[(kind, part)] = totals.get((kind, part), 0) + count

    for layer in module.modules():
        kind = layer_kind(layer)
        for name, tensor in (*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if is_quantized_tensor(tensor):
                data, overhead = split_tensor_bytes(tensor)
                add(kind, "quantized data", data)
                add(kind, "scales and offsets", overhead)
            elif not isinstance(tensor, torch.nn.Parameter):
                add(kind, "buffers", tensor_bytes(tensor))
            elif name == "bias":
                add(kind, "biases", tensor_bytes(tensor))
            else:
                add(kind, "unquantized weights", tensor_bytes(tensor))
    return totals


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(tensor) or type(tensor).__name__ in QUANTIZED_PARAMETER_TYPES


def quantized_layers(module: torch.nn.Module) -> int:
    """How many layers of ``module`` hold a quantized weight."""
    return sum(1 for layer in module.modules()
               if isinstance(weight := layer.__dict__.get("_parameters", {}).get("weight"), torch.Tensor)
               and is_quantized_tensor(weight))


# --- load-time quantization (--quantize_via pipeline) and GGUF files ------------------------------------------


class QuantizedLoading(ComponentLoading):
    """The loader :func:`load_model` gives one model while it loads: passes ``quantization_config`` to
    diffusers' and transformers' ``from_pretrained`` for the components quantized through the pipeline,
    and loads a ``.gguf`` denoiser with diffusers' GGUF quantizer.

    Families name each component's role when they load it (:meth:`ModelFamily.load_component`), so
    nothing is guessed from folder names and nothing outside this model's own calls is affected.
    ``done`` records what was quantized while loading, role -> description.
    """

    def __init__(self, config, wanted: dict[str, str], settings: dict[str, dict[str, Any]],
                 denoiser_without_weights: bool = False):
        self.config = config
        self.pipeline = dict(wanted) if config.quantize_via == "pipeline" else {}
        self.settings = settings
        self.gguf_possible = bool(gguf_sources(config))
        self.denoiser_without_weights = denoiser_without_weights
        self.done: dict[str, str] = {}

    def from_pretrained(self, family, role, model_class, path, **kwargs):
        if role == "denoiser" and self.denoiser_without_weights:  # FSDP2 fills it from the main process
            from simpletuner.models.base import build_without_weights

            logger.info("built the %s from its config on the meta device, without reading its weights: they arrive "
                        "from the main process when FSDP2 shards it (--fsdp_cpu_ram_efficient_loading)",
                        family.denoiser_name)
            return build_without_weights(model_class, path, **kwargs)
        if role == "denoiser" and (self.gguf_possible or str(path).endswith(".gguf")):
            gguf = self._gguf_file(path, kwargs.get("subfolder"))
            if gguf is not None:
                config_path, config_folder = (family.model_path, family.denoiser_name) \
                    if str(path).endswith(".gguf") else (path, kwargs.get("subfolder"))
                return self._load_gguf(family, model_class, gguf, config_path, config_folder)
        if role not in self.pipeline or "quantization_config" in kwargs:
            return model_class.from_pretrained(path, **kwargs)
        import diffusers

        diffusers_side = issubclass(model_class, diffusers.ModelMixin)
        kwargs["quantization_config"] = self._pipeline_config(family, role, diffusers_side)
        for name in ("dtype", "torch_dtype"):
            kwargs.pop(name, None)
        kwargs["torch_dtype" if diffusers_side else "dtype"] = self._dtype(family, role)
        return self._finish(role, model_class.from_pretrained(path, **kwargs))

    def from_single_file(self, family, role, model_class, file, **kwargs):
        if role == "denoiser" and str(file).endswith(".gguf") and "quantization_config" not in kwargs:
            from diffusers import GGUFQuantizationConfig

            dtype = self._dtype(family, "denoiser")
            kwargs.pop("dtype", None)
            kwargs.update(quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), torch_dtype=dtype)
            self.done["denoiser"] = f"gguf ({Path(str(file)).name})"
        return model_class.from_single_file(file, **kwargs)

    def _dtype(self, family, role: str) -> torch.dtype:
        if role == "denoiser" and self.config.base_model_default_dtype:
            return DTYPES[self.config.base_model_default_dtype]
        return family.weight_dtype

    # --- GGUF ---

    @staticmethod
    def _gguf_file(path, subfolder: str | None) -> Path | None:
        """The ``.gguf`` a denoiser load points at: the path itself, or the only weights of its folder."""
        if path is None or not isinstance(path, (str, Path)):
            return None
        if str(path).endswith(".gguf"):
            return Path(str(path))
        return gguf_denoiser_file(Path(str(path)) / subfolder if subfolder else Path(str(path)))

    def _load_gguf(self, family, model_class, file: Path, config_path, config_folder):
        from diffusers import GGUFQuantizationConfig

        dtype = self._dtype(family, "denoiser")
        module = model_class.from_single_file(str(file), config=str(config_path), subfolder=config_folder,
                                              quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                              torch_dtype=dtype)
        self.done["denoiser"] = f"gguf ({file.name})"
        return module

    # --- --quantize_via pipeline ---

    def _finish(self, role: str, module):
        """A component the loader quantized. diffusers' and transformers' QuantoConfig, TorchAoConfig and
        BitsAndBytesConfig all quantize Linear layers only, so its convolutions are quantized with
        optimum-quanto now, at the precision of its linears, as the other routes do."""
        preset = PRESETS[self.pipeline[role]]
        entry = entry_for(self.settings, role)
        settings = convolution_settings(self.config)
        if preset.backend == "quanto":
            named = entry.get("weights_dtype") or entry.get("weights") or QUANTO_PIPELINE_NAMES[preset.weights]
            weights = {name: qtype for qtype, name in QUANTO_PIPELINE_NAMES.items()
                       if not qtype.endswith("fnuz")}.get(named)
        else:
            weights = preset.conv_weights
        if weights and settings["convolutions"]:
            quantize_convolutions(module, weights, skip=skip_list(preset, entry), dtype=settings["conv_dtype"],
                                  why=CONV_REASONS[preset.backend])
        elif weights:
            _convolutions_left(module, preset.backend)
        self.done[role] = f"{self.pipeline[role]} (pipeline)"
        return module

    def _pipeline_config(self, family, role: str, diffusers_side: bool):
        """The ``quantization_config`` object of one component, in the loading library's own class."""
        preset = PRESETS[self.pipeline[role]]
        entry = entry_for(self.settings, role)
        library = __import__("diffusers" if diffusers_side else "transformers")
        activations = bool(self.config.quantize_activations) and role == "denoiser"
        if preset.backend == "quanto":
            weights = entry.pop("weights_dtype", None) or entry.pop("weights", None) \
                or QUANTO_PIPELINE_NAMES[preset.weights]
            key = "weights_dtype" if diffusers_side else "weights"
            return library.QuantoConfig(**{key: weights}, **entry)
        if preset.backend == "torchao":
            quant_type = torchao_config(preset, activations, entry.pop("quant_type", None))
            return library.TorchAoConfig(quant_type=quant_type, **entry)
        entry.setdefault("bnb_4bit_compute_dtype", self._dtype(family, role))
        return library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=preset.weights,
                                          **{k: v for k, v in entry.items() if k != "load_in_4bit"})
