"""A tiny FLUX.1 [dev] pipeline: the real diffusers/transformers classes, shaped like FLUX.1, tiny sizes.

Like the real model it has a ``FluxTransformer2DModel`` with both double-stream (MMDiT) and
single-stream blocks, the guidance embedding of the guidance-distilled [dev] checkpoints, 64 input
channels (16 latent channels packed 2x2) and a 3-axis rotary embedding; a CLIP text encoder whose
pooled output is the transformer's pooled projection; a T5 encoder of a *different* width (so mixing
the pooled and the per-token embeddings up fails loudly); a 16-channel VAE without quant convolutions
that scales pixels by 8, with FLUX.1's ``shift_factor`` / ``scaling_factor``; and the flow-matching
Euler scheduler configured with [dev]'s dynamic (resolution-dependent) shift.

Two double and two single blocks keep a 64 px training step at batch 2 around 0.05 s on two CPU
cores while still exercising every LoRA target preset (``tiny`` / ``nano`` pick single blocks by
their relative position, see :mod:`simpletuner.models.flux`).
"""

from __future__ import annotations

from simpletuner.testing.tiny.vae import four_stage_vae_config

#: The pooled CLIP embedding and the T5 tokens have different widths on purpose.
CLIP_WIDTH, T5_WIDTH = 32, 48
#: The longest T5 prompt FLUX.1 [dev] takes; the tiny tokenizer accepts as many.
T5_MAX_TOKENS = 512

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x a 2x2 patch
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=CLIP_WIDTH,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) sums to 128
)

#: FLUX.1's VAE values
VAE_CONFIG = four_stage_vae_config(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)

#: FLUX.1 [dev]'s scheduler: shift interpolated from the image token count (256 -> 0.5, 4096 -> 1.15).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``FluxPipeline`` seeded by ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from simpletuner.testing.tiny.text_encoders import tiny_t5_encoder
    from simpletuner.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer(model_max_length=T5_MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, projection_dim=CLIP_WIDTH,
        hidden_act="gelu",
    ))
    torch.manual_seed(seed + 1)
    text_encoder_2 = tiny_t5_encoder(tokenizer_2, T5_WIDTH, head_width=12)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**VAE_CONFIG)
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return pipeline, "random (tiny FLUX.1 VAE)"
