"""A tiny PixArt-Sigma pipeline: the real classes, shaped like the released model, with tiny sizes.

Like PixArt-Sigma it has a ``PixArtTransformer2DModel`` DiT that predicts noise *and* a learned
variance (``out_channels`` is twice the latent channels), conditioned only on a T5 v1.1-style encoder
(gated-GELU) through a caption projection and cross-attention with a padding mask, no size
micro-conditioning, the SD 4-channel latent space, and the DPM-Solver++ scheduler the released
checkpoints ship. The T5 width differs from the transformer width so that skipping the caption
projection fails loudly. The VAE is the project's demo VAE, trained on the shapes dataset, so the
demo data stays learnable.
"""

from __future__ import annotations

#: T5 width (the released model uses T5-XXL, 4096) and the transformer's inner width (heads x head dim).
T5_WIDTH = 48
INNER_WIDTH = 32

TRANSFORMER_CONFIG = dict(
    sample_size=16,  # 64 px at the demo VAE's scale of 4
    patch_size=2,
    in_channels=4,
    out_channels=8,  # epsilon and the learned variance
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=INNER_WIDTH // 2,
    cross_attention_dim=INNER_WIDTH,
    caption_channels=T5_WIDTH,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    use_additional_conditions=False,  # PixArt-Sigma has no resolution / aspect-ratio conditioning
)

#: The schedule the released PixArt-Sigma checkpoints ship (linear betas, epsilon, DPM-Solver++ 2M).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    timestep_spacing="linspace",
    steps_offset=0,
)

#: PixArt-Sigma's default caption length in tokens.
MAX_TOKENS = 300


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``PixArtSigmaPipeline`` seeded by ``seed``."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from simpletuner.testing.tiny.text_encoders import tiny_t5_encoder
    from simpletuner.testing.tiny_models import _demo_vae
    from simpletuner.testing.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, T5_WIDTH, head_width=12)
    torch.manual_seed(seed + 1)
    transformer = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
    vae, vae_source = _demo_vae(seed, 0)
    pipeline = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
    )
    return pipeline, vae_source
