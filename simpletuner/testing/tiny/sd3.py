"""A tiny Stable Diffusion 3.5 pipeline: the real classes, shaped like SD 3.5 Medium, with tiny sizes.

Like the real model it has an MMDiT whose first block uses the dual (MMDiT-X) attention and RMS
q/k normalisation, two CLIP encoders of *different* widths (so mixing up CLIP-L and CLIP-G, or the
pooled and the per-token embeddings, changes shapes and fails loudly), a T5 encoder wider than the two
CLIPs together (the CLIP embeddings are zero-padded to its width), a 16-channel VAE without quant
convolutions that scales pixels by 8, with SD3's ``shift_factor`` and ``scaling_factor``, and the flow
matching Euler scheduler with shift 3.
"""

from __future__ import annotations

from simpletuner.testing.tiny.vae import four_stage_vae_config

#: CLIP-L stands in at width 32, CLIP-G at 48: the pooled embedding is their concatenation (80).
CLIP_L_WIDTH, CLIP_G_WIDTH = 32, 48
T5_WIDTH = 96

TRANSFORMER_CONFIG = dict(
    sample_size=8,  # 64 px at VAE scale 8
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=T5_WIDTH,
    caption_projection_dim=32,
    pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
    pos_embed_max_size=16,  # room for images up to 256 px
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)

#: SD 3.x's VAE values
VAE_CONFIG = four_stage_vae_config(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``StableDiffusion3Pipeline`` seeded by ``seed``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from simpletuner.testing.tiny.text_encoders import tiny_clip_with_projection, tiny_t5_encoder
    from simpletuner.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer(model_max_length=256)
    torch.manual_seed(seed)
    text_encoder = tiny_clip_with_projection(tokenizer, CLIP_L_WIDTH)
    torch.manual_seed(seed + 1)
    text_encoder_2 = tiny_clip_with_projection(tokenizer_2, CLIP_G_WIDTH)
    torch.manual_seed(seed + 2)
    text_encoder_3 = tiny_t5_encoder(tokenizer_3, T5_WIDTH, head_width=16)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(**VAE_CONFIG)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return pipeline, "random (tiny SD3 VAE)"
