"""A tiny SDXL pipeline: the real classes, wired like SDXL 1.0, with tiny sizes.

Like SDXL base it has a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (the
pooled text embedding plus six Fourier-embedded size numbers, the micro-conditioning, added to the
timestep embedding), no attention in its first level and two transformer layers in its second, and
two CLIP encoders of *different* widths (a plain ``CLIPTextModel`` standing in for CLIP-L and a
``CLIPTextModelWithProjection`` for CLIP-G): cross-attention sees their penultimate hidden states
concatenated, the time embedding the projected pooled output of the second. Mixing the two up
changes shapes and fails loudly. The scheduler is the Euler one SDXL ships, and the pipeline zeroes
the negative prompt (``force_zeros_for_empty_prompt``) as SDXL base does.

The VAE is the project's demo VAE (the SD 4-channel latent space, trained on the shapes dataset) so
the demo data stays learnable; a real SDXL VAE has its own config (scaling factor 0.13025), which the
family reads from whatever checkpoint it loads.

``refiner=True`` builds the refiner's shape instead: only the CLIP-G encoder, an aesthetic score in
place of the target size in the micro-conditioning (five numbers), and the img2img pipeline.
"""

from __future__ import annotations

#: CLIP-L stands in at width 32, CLIP-G at 48; cross-attention sees both (80), the pooled vector is G's.
CLIP_L_WIDTH, CLIP_G_WIDTH = 32, 48
#: Width of each Fourier embedding of one micro-conditioning number (SDXL: 256).
TIME_EMBED_WIDTH = 8


def unet_config(refiner: bool = False) -> dict:
    """The tiny UNet: SDXL's layout at 32/64 channels; the refiner conditions on 5 numbers, base on 6."""
    size_numbers = 5 if refiner else 6
    return dict(
        sample_size=16,  # 64 px at the demo VAE's scale of 4
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=CLIP_G_WIDTH if refiner else CLIP_L_WIDTH + CLIP_G_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=size_numbers * TIME_EMBED_WIDTH + CLIP_G_WIDTH,
        norm_num_groups=16,
    )


def scheduler_config() -> dict:
    """SDXL 1.0's scheduler folder: Euler, scaled-linear betas, "leading" spacing, epsilon."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
                use_karras_sigmas=False)


def clip_encoder(tokenizer, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_tiny_pipeline(seed: int = 0, refiner: bool = False):
    """``(pipeline, vae_source)``: a seeded ``StableDiffusionXLPipeline`` (or, with ``refiner``, a
    ``StableDiffusionXLImg2ImgPipeline`` shaped like the SDXL refiner)."""
    import torch
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    from simpletuner.testing.tiny_models import _demo_vae
    from simpletuner.testing.tokenizers import build_clip_tokenizer

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = clip_encoder(tokenizer, CLIP_L_WIDTH, projection=False)
    torch.manual_seed(seed + 1)
    text_encoder_2 = clip_encoder(tokenizer_2, CLIP_G_WIDTH, projection=True)
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**unet_config(refiner))
    vae, vae_source = _demo_vae(seed, 0)
    scheduler = EulerDiscreteScheduler(**scheduler_config())
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        ), vae_source
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    ), vae_source
