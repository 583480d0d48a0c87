"""The discriminator of adversarial distillation: a small head on the features of a network's middle
block (the fake score's for DMD2 / f-distill, the frozen teacher's for LADD).

The head reads the output of one block the forward already computes (a forward hook, no model code
copied): a UNet's ``mid_block`` (its lowest-resolution feature map, ``[B, C, h, w]``) or a transformer's
middle block (image tokens, ``[B, N, D]``). It returns one logit per sample, averaged over positions.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def feature_block(model) -> torch.nn.Module:
    """The block whose output the discriminator reads."""
    denoiser = model.denoiser
    mid = getattr(denoiser, "mid_block", None)
    if mid is not None:
        return mid
    blocks = [block for _, block in model.transformer_blocks()]
    if not blocks:
        raise ValueError(f"{model.config.model_family}: no mid block or transformer blocks to put a discriminator on")
    return blocks[len(blocks) // 2]


def _tensor_of(output) -> torch.Tensor:
    """A block's image features: the tensor, or the last element of a ``(text, image)`` tuple."""
    return output[-1] if isinstance(output, (tuple, list)) else output


class FeatureTap:
    """Keeps the output of the feature block of the forwards run inside :meth:`recording`. The block is
    looked up when recording starts, in whichever network ``model.denoiser`` then is (a full-model
    student's fake score and teacher live on a copy of the denoiser)."""

    def __init__(self, model):
        self.model = model
        self.features: torch.Tensor | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator["FeatureTap"]:
        self.features = None

        def keep(module, inputs, output):
            self.features = _tensor_of(output)

        handle = feature_block(self.model).register_forward_hook(keep)
        try:
            yield self
        finally:
            handle.remove()

    def take(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("the discriminator's block did not run in this forward")
        features, self.features = self.features, None
        return features


class DiscriminatorHead(torch.nn.Module):
    """Feature map or tokens -> one logit per sample. Built for the first features it sees (their
    channel count is the model's), so it needs no family table entry."""

    def __init__(self, channels: int, spatial: bool, hidden: int = 256):
        super().__init__()
        self.spatial = spatial
        self.shape_key = (channels, spatial)
        if spatial:
            groups = 32 if channels % 32 == 0 else 1
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(channels, hidden, 3, padding=1), torch.nn.GroupNorm(min(groups, hidden), hidden),
                torch.nn.SiLU(), torch.nn.Conv2d(hidden, 1, 1))
        else:
            self.net = torch.nn.Sequential(torch.nn.LayerNorm(channels), torch.nn.Linear(channels, hidden),
                                           torch.nn.SiLU(), torch.nn.Linear(hidden, 1))

    @classmethod
    def for_features(cls, features: torch.Tensor) -> "DiscriminatorHead":
        if features.dim() == 4:
            return cls(features.shape[1], spatial=True)
        if features.dim() == 3:
            return cls(features.shape[-1], spatial=False)
        raise ValueError(f"the discriminator reads [B, C, h, w] feature maps or [B, N, D] tokens, got {tuple(features.shape)}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.net(features.float())
        return logits.flatten(1).mean(dim=1)
