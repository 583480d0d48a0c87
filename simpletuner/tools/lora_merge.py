"""Merge a LoRA (or LyCORIS) adapter into a base pipeline and save the result as a plain pipeline folder.

PEFT/kohya files go through the pipeline's own diffusers loader (``load_lora_weights``, then
``fuse_lora(lora_scale=...)``, then ``unload_lora_weights``), so the merge adds exactly what the
pipeline would add with the adapter loaded at that scale. LyCORIS files (detected by
:func:`simpletuner.models.lora_formats.detect_format`) are rebuilt on the denoiser with lycoris'
``create_lycoris_from_weights`` and folded in with ``merge_to``.

The folder is written beside the target under a temporary name and renamed into place at the end, so
an interrupted merge never leaves a half-written model where a complete one is expected.
torch and diffusers are imported inside the functions.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


class MergeError(ValueError):
    """The merge cannot be done as asked (no such input, output exists, adapter does not fit)."""


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: the adapter layout, how many layers it changed, where the model went."""

    output: Path
    adapter_format: str
    pipeline_class: str
    merged_layers: int
    scale: float

    def describe(self) -> str:
        return (f"merged {self.merged_layers} adapter layers ({self.adapter_format} file) at scale {self.scale:g} "
                f"into {self.pipeline_class}; wrote {self.output}")


def check_paths(base: Path, adapter: Path, output: Path, overwrite: bool) -> None:
    """Refuse before loading anything: a missing input, or an output folder that would be replaced."""
    if not (base / "model_index.json").is_file():
        raise MergeError(f"{base}: not a diffusers pipeline folder (no model_index.json)")
    if not adapter.is_file():
        raise MergeError(f"{adapter}: no such adapter file")
    if output.exists() and not overwrite:
        raise MergeError(f"{output} exists; pass --overwrite to replace it")
    if output.resolve() == base.resolve():
        raise MergeError("--output must differ from --base (the base is read while the merge is written)")


def denoiser_of(pipeline: Any) -> tuple[str, Any]:
    """The pipeline's denoiser component: the one LyCORIS networks from this trainer are attached to."""
    for name in ("unet", "transformer"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return name, module
    raise MergeError(f"{type(pipeline).__name__} has neither a `unet` nor a `transformer` to merge a LyCORIS file into")


def count_lora_layers(pipeline: Any) -> int:
    """PEFT adapter layers present in the pipeline's modules (0 means the file matched nothing)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(layer, BaseTunerLayer)
               for component in pipeline.components.values() if isinstance(component, torch.nn.Module)
               for layer in component.modules())


def merge_peft(pipeline: Any, adapter: Path, scale: float) -> int:
    """Fuse a diffusers/kohya LoRA with the pipeline's own loader; returns the adapted layers."""
    if not hasattr(pipeline, "load_lora_weights"):
        raise MergeError(f"{type(pipeline).__name__} has no LoRA loader (`load_lora_weights`); "
                         "it cannot merge a PEFT LoRA file")
    pipeline.load_lora_weights(str(adapter), adapter_name="merged")
    layers = count_lora_layers(pipeline)
    if layers == 0:
        raise MergeError(f"{adapter}: no key of the file names a module of {type(pipeline).__name__}")
    pipeline.fuse_lora(lora_scale=scale, adapter_names=["merged"])
    pipeline.unload_lora_weights()
    return layers


def merge_lycoris(pipeline: Any, adapter: Path, tensors: dict[str, Any], scale: float) -> int:
    """Fold a LyCORIS file into the denoiser's weights; refuses files with modules the denoiser lacks
    (lycoris itself would skip them without a word)."""
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    _, denoiser = denoiser_of(pipeline)
    names = {f"{LycorisNetwork.LORA_PREFIX}_{path}".replace(".", "_") for path, _ in denoiser.named_modules()}
    wanted = {key.split(".")[0] for key in tensors if "." in key}
    unknown = sorted(wanted - names)
    if unknown:
        raise MergeError(f"{adapter}: {len(unknown)} LyCORIS modules name no layer of the "
                         f"{type(denoiser).__name__}, e.g. {unknown[:3]}")
    network, _ = create_lycoris_from_weights(1.0, str(adapter), denoiser, weights_sd=dict(tensors))
    network.eval()  # no rank/module dropout while computing the weights to fold in
    correct_double_scaled_modules(network)
    network.merge_to(scale)
    return len(network.loras)


def correct_double_scaled_modules(network: Any) -> int:
    """Make ``merge_to`` fold in what the module's forward adds, for lycoris versions that do not.

    lycoris-lora 4.x ``LohaModule.get_diff_weight`` (used by ``merge_to``) multiplies by ``alpha/dim``
    after ``get_weight`` already did, so a LoHa with alpha != dim would merge at ``(alpha/dim)^2``
    while inference with the adapter applies ``alpha/dim``. Detected numerically per module, never
    assumed: where merge's difference is the forward's times the scale, the scale is set to its
    square root, which makes the two agree. Returns the number of modules corrected.
    """
    import math

    import torch

    corrected = 0
    for module in network.loras:
        scale = float(getattr(module, "scale", 1.0))
        if scale in (0.0, 1.0) or getattr(module, "wd", False) or not hasattr(module, "get_weight"):
            continue
        with torch.no_grad():
            forward = module.get_weight(module.shape) * module.scalar
            merged = module.get_diff_weight(1.0, module.shape)[0]
        if not torch.allclose(merged, forward, rtol=1e-4, atol=1e-7) and \
                torch.allclose(merged, forward * scale, rtol=1e-4, atol=1e-7):
            module.scale = math.sqrt(scale)
            corrected += 1
    return corrected


def save_atomically(pipeline: Any, output: Path, overwrite: bool) -> None:
    """``save_pretrained`` into a temporary folder beside ``output``, then rename it into place
    (the previous folder, with --overwrite, is removed only once the new one is complete)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}.merging-{os.getpid()}"
    old = output.parent / f".{output.name}.replaced-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        pipeline.save_pretrained(str(temp), safe_serialization=True)
        if output.exists():
            if not overwrite:
                raise MergeError(f"{output} appeared during the merge; pass --overwrite to replace it")
            output.rename(old)
        temp.rename(output)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def merge_lora(base: str | Path, adapter: str | Path, output: str | Path, scale: float = 1.0,
               overwrite: bool = False, dtype: str = "float32") -> MergeReport:
    """The whole ``simpletuner merge-lora`` run: load ``base``, fold the adapter in, save ``output``."""
    import torch
    from diffusers import DiffusionPipeline

    from simpletuner.models.lora_formats import LoraFile

    base, adapter, output = Path(base), Path(adapter), Path(output)
    check_paths(base, adapter, output, overwrite)
    try:
        lora_file = LoraFile.read(adapter)
    except Exception as error:  # LoraFormatError, OSError, or safetensors' own error types
        raise MergeError(f"{adapter}: not a readable safetensors adapter ({error})") from error
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(base), torch_dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        raise MergeError(f"cannot load the pipeline in {base}: {error}") from error
    pipeline.to("cpu")
    if lora_file.format == "lycoris":
        layers = merge_lycoris(pipeline, adapter, lora_file.tensors, scale)
    else:
        layers = merge_peft(pipeline, adapter, scale)
    save_atomically(pipeline, output, overwrite)
    return MergeReport(output, lora_file.format, type(pipeline).__name__, layers, scale)
