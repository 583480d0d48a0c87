"""A tiny Sana pipeline: the real classes, wired like Efficient-Large-Model's Sana checkpoints, with tiny sizes.

Like the real model it has a ``SanaTransformer2DModel`` with patch size 1 (one token per latent cell),
linear self-attention and cross-attention to the text, a Gemma 2 text encoder whose width differs
from the transformer's (the caption projection maps it), an ``AutoencoderDC`` that compresses 32x per
side (six stages, the last three with EfficientViT attention) into more channels than an SD VAE, with
Sana's ``scaling_factor``, and the shipped DPM-Solver++ scheduler with flow sigmas and shift 3.
"""

from __future__ import annotations

GEMMA_WIDTH = 24
LATENT_CHANNELS = 8

TRANSFORMER_CONFIG = dict(
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=GEMMA_WIDTH,
    mlp_ratio=2.5,
    sample_size=32,
    patch_size=1,
)

VAE_CONFIG = dict(
    in_channels=3,
    latent_channels=LATENT_CHANNELS,
    attention_head_dim=4,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(8, 8, 8, 16, 16, 16),
    decoder_block_out_channels=(8, 8, 8, 16, 16, 16),
    encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,  # Sana's DC-AE f32c32
)

#: The released checkpoints' scheduler folder: DPM-Solver++ over flow sigmas with shift 3.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                        flow_shift=3.0, algorithm_type="dpmsolver++", solver_order=2)


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``SanaPipeline`` seeded by ``seed``."""
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from simpletuner.testing.tiny.gemma import build_gemma_tokenizer, tiny_gemma2

    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_gemma2(tokenizer, GEMMA_WIDTH)
    torch.manual_seed(seed + 1)
    transformer = SanaTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderDC(**VAE_CONFIG)
    pipeline = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG))
    return pipeline, "random (tiny Sana DC-AE)"
