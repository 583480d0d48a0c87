"""Tiny Wan pipelines: the real diffusers/transformers classes, shaped like each Wan checkpoint, tiny sizes.

Four variants, one per checkpoint shape the family handles (:mod:`simpletuner.models.wan`):

* ``t2v-2.1``: ``WanPipeline``, a 16-channel causal video VAE (8x space, 4x time), a two-block
  ``WanTransformer3DModel`` and a UMT5 encoder;
* ``i2v-2.1``: ``WanImageToVideoPipeline`` whose transformer reads 36 channels (noisy latents, the
  4-channel first-frame mask, the first frame's latents) and CLIP image features (a tiny
  ``CLIPVisionModel`` with its processor);
* ``ti2v-2.2``: the 5B shape: a 48-channel VAE that patchifies 2x2 before encoding (16x space) and a
  pipeline with ``expand_timesteps`` (a timestep per token);
* ``a14b-2.2``: two transformers, ``transformer`` for the high-noise and ``transformer_2`` for the
  low-noise part of the schedule, split at ``boundary_ratio`` 0.875 (the T2V A14B's);
  ``i2v-a14b-2.2`` is the same with 36 input channels and no image encoder (the I2V A14B's).

The VAEs carry per-channel ``latents_mean`` / ``latents_std`` away from 0 / 1, so normalisation
mistakes change numbers. A training step on a 9-frame 32 px clip takes a few hundredths of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

VARIANTS = ("t2v-2.1", "i2v-2.1", "ti2v-2.2", "a14b-2.2", "i2v-a14b-2.2")
#: The ``--model_flavour`` whose checkpoint each variant imitates (flow shift, i2v mode).
FLAVOUR_OF = {"t2v-2.1": "t2v-1.3b-2.1", "i2v-2.1": "i2v-480p-14b-2.1", "ti2v-2.2": "ti2v-5b-2.2",
              "a14b-2.2": "t2v-a14b-2.2", "i2v-a14b-2.2": "i2v-a14b-2.2"}
TEXT_WIDTH = 32
#: CLIP vision hidden size: the transformer's ``image_dim``.
IMAGE_WIDTH = 16
T5_MAX_TOKENS = 512
BOUNDARY_RATIO = {"a14b-2.2": 0.875, "i2v-a14b-2.2": 0.9}


def _vae_config(channels: int) -> dict:
    """A tiny causal video VAE; 48 channels means the 5B shape (2x2 patchify, residual blocks)."""
    config = dict(base_dim=8, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True],
                  latents_mean=[round(-0.3 + 0.6 * i / (channels - 1), 4) for i in range(channels)],
                  latents_std=[round(0.7 + 0.6 * i / (channels - 1), 4) for i in range(channels)])
    if channels == 48:
        config.update(in_channels=12, out_channels=12, is_residual=True, patch_size=2, scale_factor_spatial=16)
    return config


def _transformer(in_channels: int, out_channels: int, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=out_channels, text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        rope_max_seq_len=32, image_dim=image_dim, added_kv_proj_dim=16 if image_dim is not None else None)


def build_tiny_pipeline(seed: int = 0, variant: str = "t2v-2.1"):
    """``(pipeline, vae_source)``: a random-weight Wan pipeline of ``variant`` seeded by ``seed``."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from simpletuner.testing.tokenizers import build_t5_tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny wan variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tokenizer = build_t5_tokenizer(model_max_length=T5_MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_ff=2 * TEXT_WIDTH, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    channels = 48 if variant == "ti2v-2.2" else 16
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**_vae_config(channels))
    i2v_channels = 2 * channels + 4  # noisy latents, first-frame mask (one channel per frame of a group), condition
    common = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                  scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=3.0, num_train_timesteps=1000))
    torch.manual_seed(seed + 2)
    if variant == "i2v-2.1":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=IMAGE_WIDTH, intermediate_size=2 * IMAGE_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=IMAGE_WIDTH))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        transformer = _transformer(i2v_channels, channels, image_dim=IMAGE_WIDTH)
        pipeline = WanImageToVideoPipeline(**common, transformer=transformer, image_encoder=image_encoder,
                                           image_processor=processor)
    elif variant in BOUNDARY_RATIO:
        in_channels = i2v_channels if variant.startswith("i2v") else channels
        transformer = _transformer(in_channels, channels)
        torch.manual_seed(seed + 3)
        transformer_2 = _transformer(in_channels, channels)
        pipeline_class = WanImageToVideoPipeline if variant.startswith("i2v") else WanPipeline
        pipeline = pipeline_class(**common, transformer=transformer, transformer_2=transformer_2,
                                  boundary_ratio=BOUNDARY_RATIO[variant])
    else:
        pipeline = WanPipeline(**common, transformer=_transformer(channels, channels),
                               expand_timesteps=variant == "ti2v-2.2")
    return pipeline, f"random (tiny Wan {variant} VAE)"


def make_tiny_wan(out: str | Path, variant: str = "t2v-2.1", seed: int = 0) -> Path:
    """Write the tiny ``variant`` pipeline folder to ``out`` (what ``make-tiny-model --family wan``
    writes for ``t2v-2.1``); returns ``out``."""
    pipeline, vae_source = build_tiny_pipeline(seed, variant)
    out = Path(out)
    pipeline.save_pretrained(out, safe_serialization=True)
    (out / "simpletuner_tiny_model.json").write_text(
        json.dumps({"family": "wan", "variant": variant, "seed": seed, "vae": vae_source}, indent=2) + "\n",
        encoding="utf-8")
    return out
