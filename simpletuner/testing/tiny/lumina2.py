"""A tiny Lumina-Image 2.0 pipeline: the real classes, wired like Alpha-VLLM/Lumina-Image-2.0, with tiny sizes.

Like the real model it has a ``Lumina2Transformer2DModel`` (2x2 patches, grouped-query attention with
fewer key/value heads than query heads, 3-axis rotary embeddings, noise and caption refiner blocks in
front of the main layers), a Gemma 2 text encoder whose width differs from the transformer's (the
caption embedder maps it), a 16-channel VAE with FLUX.1's ``shift_factor`` / ``scaling_factor`` and
four stages (the pipeline assumes 8 pixels per latent cell), and a flow-matching Euler scheduler.
"""

from __future__ import annotations

from simpletuner.testing.tiny.vae import four_stage_vae_config

GEMMA_WIDTH = 24

TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    hidden_size=32,
    num_layers=2,
    num_refiner_layers=1,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=16,
    axes_dim_rope=(8, 4, 4),  # sums to the head width (32 / 2)
    axes_lens=(300, 64, 64),
    cap_feat_dim=GEMMA_WIDTH,
)

#: FLUX.1's VAE, which Lumina 2 uses
VAE_CONFIG = four_stage_vae_config(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``Lumina2Pipeline`` seeded by ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    from simpletuner.testing.tiny.gemma import build_gemma_tokenizer, tiny_gemma2

    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_gemma2(tokenizer, GEMMA_WIDTH)
    torch.manual_seed(seed + 1)
    transformer = Lumina2Transformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE_CONFIG)
    pipeline = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
                               vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    return pipeline, "random (tiny FLUX.1-shaped VAE)"
