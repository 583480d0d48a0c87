"""Channel-concatenated control for FLUX (``--control``), the way "FLUX.1 Canny/Depth [dev]" work.

The control image is encoded by the VAE like a training image and packed into the same 2x2-cell tokens;
each image token then carries its own latent cells followed by the control image's, so the
transformer's input embedding (``x_embedder``) takes twice the channels. A base transformer is
widened once, after loading: the new input columns start at zero, so before training the model
behaves exactly like the base. A transformer that is already widened (a Flux Control checkpoint) is
left as it is. diffusers' ``FluxControlPipeline`` samples with it (``control_image=``) and loads the
saved pipeline folder, whose transformer config records the doubled ``in_channels``.
"""

from __future__ import annotations

import torch


def latent_token_channels(transformer: torch.nn.Module) -> int:
    """Channels of one packed latent token (what the transformer outputs per token)."""
    config = transformer.config
    return int(config.out_channels or config.in_channels)


def is_widened(transformer: torch.nn.Module) -> bool:
    return transformer.x_embedder.in_features == 2 * latent_token_channels(transformer)


def widen_input_embedding(transformer: torch.nn.Module) -> bool:
    """Give ``transformer.x_embedder`` room for the control tokens, the new weights zero; returns
    False when it already has it."""
    if is_widened(transformer):
        return False
    old = transformer.x_embedder
    channels = latent_token_channels(transformer)
    wide = torch.nn.Linear(2 * channels, old.out_features, bias=old.bias is not None,
                           device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :channels].copy_(old.weight)
        if old.bias is not None:
            wide.bias.copy_(old.bias)
    wide.weight.requires_grad_(old.weight.requires_grad)
    transformer.x_embedder = wide
    transformer.register_to_config(in_channels=2 * channels, out_channels=channels)
    return True


def control_tokens(family, control_pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The control images (B, 3, H, W) in [-1, 1] as packed latent tokens, as ``FluxControlPipeline``
    makes them: a VAE latent sample, shifted and scaled, packed in 2x2 cells."""
    from diffusers import FluxPipeline

    vae = family.vae
    with torch.no_grad():
        latents = vae.encode(control_pixels.to(family.device, vae.dtype)).latent_dist.sample()
    latents = ((latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).to(dtype)
    count, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, count, channels, height, width)


def validation_pipeline_class():
    """``FluxControlPipeline`` as the validation runner calls it: the runner passes
    ``negative_prompt=None`` to every pipeline, and this one takes no negative prompt at all (the
    config rules refuse ``--validation_negative_prompt`` with ``--control``)."""
    from diffusers import FluxControlPipeline

    class FluxControlValidationPipeline(FluxControlPipeline):
        def __call__(self, *args, negative_prompt=None, **kwargs):
            if negative_prompt:
                raise ValueError("FluxControlPipeline takes no negative prompt; remove --validation_negative_prompt")
            return super().__call__(*args, **kwargs)

    return FluxControlValidationPipeline
