"""A tiny DINOv2 vision encoder for offline tests of the representation-alignment regularizers.

It is the real ``transformers.Dinov2Model`` class with a handful of small layers, written with
``save_pretrained`` so tests load it through the same ``from_pretrained`` path a downloaded DINOv2 uses.
"""

from __future__ import annotations

from pathlib import Path

#: Patch size of the tiny encoder, the same as every released DINOv2 (so a 56-pixel image is 4x4 patches).
TINY_DINOV2_PATCH = 14


def make_tiny_dinov2(folder: str | Path, seed: int = 0, hidden_size: int = 24) -> Path:
    """Write a randomly initialised two-layer Dinov2Model to ``folder`` and return the folder."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=2 * hidden_size, patch_size=TINY_DINOV2_PATCH, image_size=56)
    folder = Path(folder)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def make_tiny_autoencoder_tiny(folder: str | Path, seed: int = 0, latent_channels: int = 4, levels: int = 3) -> Path:
    """Write a randomly initialised ``diffusers.AutoencoderTiny`` (a Tiny AutoEncoder, the TAESD class) to
    ``folder``: ``levels`` blocks of 8 channels, so it upsamples by 2 ** (levels - 1) like the tiny VAEs."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    channels = (8,) * levels
    tiny = AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                           num_encoder_blocks=(1,) * levels, num_decoder_blocks=(1,) * levels,
                           latent_channels=latent_channels)
    folder = Path(folder)
    tiny.save_pretrained(folder)
    return folder
