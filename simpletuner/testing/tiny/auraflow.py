"""A tiny AuraFlow pipeline: the real classes, shaped like AuraFlow v0.3, with tiny sizes.

Like the released model it has an ``AuraFlowTransformer2DModel`` that starts with joint (MMDiT) blocks
and continues with single DiT blocks over the concatenated text and image tokens, learned position
embeddings on a square grid (``pos_embed_max_size`` cells, centre-cropped to the image), register tokens,
a UMT5 text encoder (Pile-T5 in the real model) whose width differs from the transformer's so a
skipped caption projection fails loudly, a 4-channel SD-style VAE and the flow-matching Euler scheduler
with the shift the released checkpoint ships (1.73). The VAE is the project's demo VAE, trained on the
shapes dataset, so the demo data stays learnable.
"""

from __future__ import annotations

#: UMT5 width (Pile-T5-XL is 2048 wide) and the transformer's inner width (heads x head dim).
UMT5_WIDTH = 48
INNER_WIDTH = 32

TRANSFORMER_CONFIG = dict(
    sample_size=16,  # 64 px at the demo VAE's scale of 4
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_mmdit_layers=1,
    num_single_dit_layers=2,
    attention_head_dim=8,
    num_attention_heads=INNER_WIDTH // 8,
    joint_attention_dim=UMT5_WIDTH,
    caption_projection_dim=INNER_WIDTH,  # the joint blocks need text tokens as wide as image tokens
    pos_embed_max_size=256,  # a 16x16 grid of 2x2 patches: images up to 128 px at VAE scale 4
)

#: The shift of the flow-matching scheduler the released AuraFlow checkpoints ship.
SCHEDULER_SHIFT = 1.73
#: AuraFlow's default caption length in tokens (its pipeline's ``max_sequence_length``).
MAX_TOKENS = 256


def tiny_umt5_encoder(tokenizer, width: int = UMT5_WIDTH, head_width: int = 12, heads: int = 4):
    """A random ``UMT5EncoderModel`` (per-layer relative position biases, unlike T5) sized to
    ``tokenizer``; seeded by the caller (global RNG)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=head_width, num_layers=2, num_heads=heads,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``AuraFlowPipeline`` seeded by ``seed``."""
    import torch
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from simpletuner.testing.tiny_models import _demo_vae
    from simpletuner.testing.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = tiny_umt5_encoder(tokenizer)
    torch.manual_seed(seed + 1)
    transformer = AuraFlowTransformer2DModel(**TRANSFORMER_CONFIG)
    vae, vae_source = _demo_vae(seed, 0)
    pipeline = AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT),
    )
    return pipeline, vae_source
