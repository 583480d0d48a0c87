"""A tiny DeepFloyd IF pipeline: the real classes, shaped like IF, with tiny sizes.

Like the real model it works on pixels (no VAE): a ``UNet2DConditionModel`` with IF's block types
(ResNet up/down-sampling blocks, "simple" cross-attention blocks whose attention also attends to the
projected text tokens through ``add_k_proj``/``add_v_proj``), a T5 encoder narrower than the UNet's
cross-attention width (``encoder_hid_dim`` projects it, as IF projects T5-XXL's 4096), attention
pooling of the text into the time embedding (``addition_embed_type="text"``), six output channels
(noise plus the learned variance) and IF's DDPM schedule (``squaredcos_cap_v2``, learned range,
dynamic thresholding).

Stage I (:class:`~diffusers.IFPipeline`) denoises 3 channels; stage II
(:class:`~diffusers.IFSuperResolutionPipeline`) also reads the noise-augmented, upscaled low-res image
(6 input channels) and embeds the augmentation level as a class label (``class_embed_type="timestep"``).
"""

from __future__ import annotations

T5_WIDTH = 24

#: Attention only at the lowest of three levels (16x16 for a 64 px image) keeps a step cheap on a CPU.
UNET_CONFIG = dict(
    sample_size=64,
    layers_per_block=1,
    block_out_channels=(8, 16, 32),
    down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
    in_channels=3,
    out_channels=6,
    cross_attention_dim=32,
    encoder_hid_dim=T5_WIDTH,
    attention_head_dim=8,
    addition_embed_type="text",
    addition_embed_type_num_heads=2,
    cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift",
    act_fn="gelu",
    norm_num_groups=4,
)

#: Stage II: the upscaled low-res image is concatenated to the noisy image, and the noise level of its
#: augmentation is embedded like a timestep and added to the time embedding.
STAGE_II_UNET_CONFIG = dict(
    UNET_CONFIG,
    in_channels=6,
    class_embed_type="timestep",
    mid_block_scale_factor=1.414,
    time_embedding_act_fn="gelu",
)

#: IF's training schedule (as its hub folders ship it, bar the thresholding range).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    beta_start=0.0001,
    beta_end=0.02,
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
    sample_max_value=1.0,
    prediction_type="epsilon",
    variance_type="learned_range",
)

#: Stage II's schedule for the noise augmentation of the low-res input.
IMAGE_NOISING_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                      beta_start=0.0001, beta_end=0.02)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_ff=2 * T5_WIDTH, d_kv=8, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def build_tiny_pipeline(seed: int = 0, stage: int = 1):
    """``(pipeline, vae_source)``: a random-weight ``IFPipeline`` (stage 1) or
    ``IFSuperResolutionPipeline`` (stage 2) seeded by ``seed``; IF has no VAE."""
    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel

    from simpletuner.testing.tokenizers import build_t5_tokenizer

    if stage not in (1, 2):
        raise ValueError(f"DeepFloyd IF has stages 1 and 2 here, not {stage!r}")
    tokenizer = build_t5_tokenizer(model_max_length=77)  # IF's pipelines tokenize to 77 tokens
    torch.manual_seed(seed)
    text_encoder = _t5(tokenizer)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**(UNET_CONFIG if stage == 1 else STAGE_II_UNET_CONFIG))
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                      scheduler=DDPMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
                      watermarker=None, requires_safety_checker=False)
    if stage == 1:
        return IFPipeline(**components), "none (pixel-space model)"
    return IFSuperResolutionPipeline(image_noising_scheduler=DDPMScheduler(**IMAGE_NOISING_SCHEDULER_CONFIG),
                                     **components), "none (pixel-space model)"
