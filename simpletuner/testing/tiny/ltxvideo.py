"""A tiny LTX-Video pipeline: the real diffusers/transformers classes, shaped like LTX-Video, tiny sizes.

Like the released model it has an ``LTXVideoTransformer3DModel`` over 1x1x1 patches of the latent
video with a 3-axis rotary embedding and a per-token timestep input; a T5 encoder read through its
attention mask; a causal ``AutoencoderKLLTXVideo`` that compresses time by 8 (so clips have 8k+1
frames, the first latent frame holding the first picture alone) with timestep-conditioned decoding
(LTX-Video 0.9.1 and later) and per-channel ``latents_mean`` / ``latents_std`` that are not 0 and 1,
so forgetting the normalisation shows; and the flow-matching Euler scheduler with LTX-Video's
dynamic shift (0.95 at 1024 tokens, 2.05 at 4096).

The VAE compresses space by 8 rather than 32 (the real one also folds 4x4 pixel patches into
channels): a 9-frame clip of 32x32 pixels becomes 2 latent frames of 4x4, about 0.02 s per training
step on two CPU cores.
"""

from __future__ import annotations

#: T5 width; the transformer projects captions from it to its own width.
T5_WIDTH = 32
#: The T5 prompt length LTX-Video's pipelines use.
T5_MAX_TOKENS = 128
LATENT_CHANNELS = 8

TRANSFORMER_CONFIG = dict(
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,  # equals heads x head width, as in the real model (2048 = 32 x 64)
    num_layers=2,
    caption_channels=T5_WIDTH,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    layers_per_block=(1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, True, False),  # three halvings of time and space: 8x each
    decoder_spatio_temporal_scaling=(True, True, True, False),
    decoder_inject_noise=(False, False, False, False, False),
    upsample_residual=(False, False, False, False),
    upsample_factor=(1, 1, 1, 1),
    timestep_conditioning=True,
    patch_size=1,
    patch_size_t=1,
    encoder_causal=True,
    decoder_causal=False,
)

#: LTX-Video's scheduler: shift exp(mu), mu interpolated from the video token count.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.95,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
)


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``LTXPipeline`` seeded by ``seed``."""
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    from simpletuner.testing.tiny.text_encoders import tiny_t5_encoder
    from simpletuner.testing.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(model_max_length=T5_MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, T5_WIDTH, head_width=8)
    torch.manual_seed(seed + 1)
    transformer = LTXVideoTransformer3DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLLTXVideo(**VAE_CONFIG)
    generator = torch.Generator().manual_seed(seed + 3)
    vae.latents_mean.copy_(0.2 * torch.randn(LATENT_CHANNELS, generator=generator))
    vae.latents_std.copy_(0.5 + torch.rand(LATENT_CHANNELS, generator=generator))
    pipeline = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return pipeline, "random (tiny LTX-Video VAE)"
