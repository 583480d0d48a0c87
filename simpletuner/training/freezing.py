"""Which weights train: BitFit and the text encoder's layer-freezing strategies.

BitFit (Ben Zaken et al. 2022) updates only bias terms: a tiny share of the parameters that still
adapts a model noticeably, with a checkpoint the size of the biases.

``--freeze_encoder_strategy`` keeps part of a fully trained text encoder frozen, by layer index
``i`` of its transformer blocks:

* ``before``: layers ``i < freeze_encoder_before`` are frozen (the early, general layers);
* ``after``: layers ``i > freeze_encoder_after`` are frozen;
* ``between``: layers ``freeze_encoder_before <= i <= freeze_encoder_after`` are frozen.
"""

from __future__ import annotations

import torch


def apply_bitfit(module: torch.nn.Module) -> int:
    """Freeze everything in ``module`` except parameters named ``bias``; returns how many train."""
    trainable = 0
    for name, parameter in module.named_parameters():
        keep = name.rsplit(".", 1)[-1] == "bias"
        parameter.requires_grad_(keep)
        trainable += parameter.numel() if keep else 0
    return trainable


def encoder_layers(text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a CLIP/T5-style text encoder, in order."""
    for path in ("text_model.encoder.layers", "encoder.block", "encoder.layers", "model.layers"):
        module = text_encoder
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return list(module)
    raise ValueError(f"cannot find the transformer layers of {type(text_encoder).__name__} to freeze")


def frozen_layer_indices(count: int, strategy: str, before: int | None, after: int | None) -> list[int]:
    if strategy == "before":
        return [i for i in range(count) if i < before]
    if strategy == "after":
        return [i for i in range(count) if i > after]
    if strategy == "between":
        return [i for i in range(count) if before <= i <= after]
    raise ValueError(f"unknown freeze_encoder_strategy {strategy!r}")


def freeze_encoder_layers(text_encoder: torch.nn.Module, strategy: str | None, before: int | None,
                          after: int | None) -> list[int]:
    """Apply ``--freeze_encoder_strategy``; returns the frozen layer indices."""
    if not strategy:
        return []
    layers = encoder_layers(text_encoder)
    frozen = frozen_layer_indices(len(layers), strategy, before, after)
    for index in frozen:
        layers[index].requires_grad_(False)
    return frozen
