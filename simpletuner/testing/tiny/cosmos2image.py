"""A tiny Cosmos-Predict2 text-to-image pipeline: the real classes, shaped like the released 2B model,
with tiny sizes.

Like ``nvidia/Cosmos-Predict2-2B-Text2Image`` it has a ``CosmosTransformer3DModel`` (self-attention,
cross-attention to T5 and an MLP per block, AdaLN-LoRA modulation, 3-D rotary positions plus a learned
position embedding, 1x2x2 patches), a T5 v1.1-style encoder whose width differs from the transformer's
(the blocks cross-attend to it directly, so a wrong width fails loudly), the Wan causal 3-D VAE
(``AutoencoderKLWan``, 8 pixels per latent cell, per-channel latent mean / std) that encodes an image
as a one-frame clip, and the flow-matching Euler scheduler with Karras sigmas the release ships, which
the pipeline drives in EDM sigmas (0.002 .. 80).

One difference from the release, on purpose: ``concat_padding_mask`` is False. The released
transformer concatenates a (zero) padding-mask channel, resized with torchvision, which this
project does not depend on; see :func:`simpletuner.models.cosmos2image.check_padding_mask_support`.
"""

from __future__ import annotations

#: T5 width (the release uses T5-11B's encoder, 1024 wide) and the transformer's inner width.
T5_WIDTH = 48
INNER_WIDTH = 32

TRANSFORMER_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=INNER_WIDTH // 2,
    num_layers=2,
    mlp_ratio=2.0,
    text_embed_dim=T5_WIDTH,
    adaln_lora_dim=8,
    max_size=(4, 32, 32),  # latent frames, height, width: images up to 256 px at 8 px per cell
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0),  # the text-to-image release's
    concat_padding_mask=False,  # the release sets True, which needs torchvision (see the module docstring)
    extra_pos_embed_type=None,  # the 2B text-to-image release has no learned position embedding
)

VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],  # three spatial halvings: 8 pixels per latent cell
    latents_mean=[round(-0.3 + 0.04 * i, 4) for i in range(16)],
    latents_std=[round(0.7 + 0.04 * i, 4) for i in range(16)],
)

#: The scheduler config the release ships (the pipeline re-registers the EDM sigma range on it).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=False,
    use_karras_sigmas=True,
)

#: Cosmos' default caption length in tokens (the pipeline's ``max_sequence_length``).
MAX_TOKENS = 512


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``Cosmos2TextToImagePipeline`` seeded by ``seed``."""
    import torch
    from diffusers import (AutoencoderKLWan, Cosmos2TextToImagePipeline, CosmosTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)

    from simpletuner.models.cosmos2image import PassThroughSafetyChecker, without_saved_safety_checker
    from simpletuner.testing.tiny.text_encoders import tiny_t5_encoder
    from simpletuner.testing.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, T5_WIDTH, head_width=12)
    torch.manual_seed(seed + 1)
    transformer = CosmosTransformer3DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    pipeline = Cosmos2TextToImagePipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), safety_checker=PassThroughSafetyChecker(),
    )
    return without_saved_safety_checker(pipeline), "random (tiny Wan-shaped 3-D VAE)"
