"""The tiny four-stage ``AutoencoderKL`` config shared by the image families' tiny pipelines.

Flux, SD3, Lumina 2, HiDream and OmniGen all decode through an SD-style KL autoencoder with four
stages (8 pixels per latent cell, which their pipelines assume). Their tiny versions differ only in the
latent width, the scaling / shift the real checkpoint ships and whether the quant convolutions are
kept, so the block layout is written once here and each recipe names just what sets it apart.
"""

from __future__ import annotations


def four_stage_vae_config(latent_channels: int, scaling_factor: float, shift_factor: float | None = None,
                          quant_convs: bool = False) -> dict:
    """``AutoencoderKL`` keyword arguments for a tiny four-stage VAE of ``latent_channels`` latents.

    ``scaling_factor`` / ``shift_factor`` are the released VAE's (the trainer reads them from the
    saved config, so the tiny one must carry the real values); ``quant_convs`` keeps the 1x1 quant
    convolutions that SD-style VAEs have and FLUX.1-style ones drop."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
        scaling_factor=scaling_factor,
    )
    if not quant_convs:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    if shift_factor is not None:
        config["shift_factor"] = shift_factor
    return config
