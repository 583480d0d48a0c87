"""RamTorch in plain torch: layer weights that live in CPU memory and stream to the accelerator.

The RamTorch package replaces ``nn.Linear`` layers by versions whose weights stay in CPU RAM and are
copied to the GPU for each use. Here the same effect comes from :class:`~simpletuner.models.block_swap.WeightSwapper`
with one unit per layer: a layer's frozen weight is copied in right before the layer runs (forward,
or backward through the saved-tensors hook) and dropped right after, so at most one layer's weight
is on the accelerator at a time. Trainable tensors (LoRA adapters) stay on the accelerator, which
is why ``--set_grads_to_none`` is not needed here the way the package needs it.

Which layers: every ``nn.Linear`` (plus Embedding, LayerNorm, GroupNorm, RMSNorm and convolutions
when ``--ramtorch_disable_extensions false``) whose full name or class name matches one of
``--ramtorch_target_modules`` (fnmatch globs; a bare name also matches everything inside it), the
first ``--ramtorch_transformer_percent`` percent of them in module order. ``--ramtorch_text_encoder``
does the same for the text encoders (``--ramtorch_text_encoder_percent``), ``--ramtorch_vae`` for the
Linear layers of the VAE's mid block.

Why not the ``ramtorch`` package itself (checked against RamTorch 1.11.0, the newest on the index):
its ``ramtorch.Linear`` is CUDA-only (CUDA streams and events, pinned memory; constructing one
without a GPU raises "Cannot access accelerator device"), ``ramtorch.helpers`` fails to import
without CUDA (a default argument calls ``torch.cuda.current_device()``), it converts only
``nn.Linear`` (no Embedding, norms or convolutions for ``--ramtorch_disable_extensions false``), and
its layer is not an ``nn.Linear`` subclass, so PEFT cannot put a LoRA on a converted layer. Our
layer-wise swapper covers all of that and runs (and is tested) on CPU too.
"""

from __future__ import annotations

import fnmatch
import logging

import torch

from simpletuner.models.block_swap import WeightSwapper

logger = logging.getLogger(__name__)

EXTENSION_TYPES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Conv1d, torch.nn.Conv2d,
                   torch.nn.Conv3d) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def _matches(name: str, module: torch.nn.Module, patterns: list[str]) -> bool:
    if not patterns:
        return True
    for pattern in patterns:
        candidates = [pattern] if any(ch in pattern for ch in "*?[") else [pattern, pattern + ".*"]
        for candidate in candidates:
            if fnmatch.fnmatchcase(name, candidate) or fnmatch.fnmatchcase(type(module).__name__, candidate):
                return True
    return False


def eligible_layers(root: torch.nn.Module, patterns: list[str] | None, percent: int, extensions: bool,
                    prefix: str = "") -> list[tuple[str, torch.nn.Module]]:
    """The layers RamTorch converts: matching leaf layers with frozen weights, the first ``percent``%."""
    types = (torch.nn.Linear,) + (EXTENSION_TYPES if extensions else ())
    layers = []
    for name, module in root.named_modules(prefix=prefix):
        if not isinstance(module, types):
            continue
        if not any(not p.requires_grad for p in module.parameters(recurse=False)):
            continue  # nothing frozen to stream (a LoRA adapter's own layers)
        if _matches(name, module, list(patterns or [])):
            layers.append((name, module))
    keep = round(len(layers) * max(0, min(100, percent)) / 100)
    return layers[:keep]


def install_ramtorch(model, config, compute_device, copy_on_same_device: bool = False) -> list[WeightSwapper]:
    """Convert the configured layers of the denoiser (and text encoders / VAE); one swapper each."""
    from simpletuner.training.offload import text_encoders_of, vae_of

    extensions = not config.ramtorch_disable_extensions
    targets = config.ramtorch_target_modules
    swappers = []
    layers = eligible_layers(model.denoiser, targets, config.ramtorch_transformer_percent, extensions)
    if layers:
        swappers.append(WeightSwapper(layers, model.denoiser, compute_device, "cpu",
                                      copy_on_same_device=copy_on_same_device))
    if config.ramtorch_text_encoder:
        for name, encoder in text_encoders_of(model).items():
            chosen = eligible_layers(encoder, None, config.ramtorch_text_encoder_percent, extensions, prefix=name)
            if chosen:
                swappers.append(WeightSwapper(chosen, encoder, compute_device, "cpu",
                                              copy_on_same_device=copy_on_same_device))
    vae = vae_of(model)
    if config.ramtorch_vae and vae is not None:
        chosen = []
        for side in ("encoder", "decoder"):
            mid = getattr(getattr(vae, side, None), "mid_block", None)
            if mid is not None:
                chosen += eligible_layers(mid, None, 100, False, prefix=f"vae.{side}.mid_block")
        if chosen:
            swappers.append(WeightSwapper(chosen, None, compute_device, "cpu",
                                          copy_on_same_device=copy_on_same_device))
    if not swappers:
        raise ValueError("--ramtorch matched no layer with frozen weights; check --ramtorch_target_modules")
    for swapper in swappers:
        logger.info("RamTorch: %d layers, %.1f MiB stream from CPU memory", len(swapper.units),
                    swapper.swapped_bytes / 2**20)
    return swappers
