"""Tiny random T5 and CLIP text encoders for the tiny pipelines of the families that read them.

Flux, SD3, PixArt-Sigma and LTX-Video all read captions through a ``T5EncoderModel``; their tiny
recipes differ only in the width and the per-head width, so the rest of the config (two layers, gated
GELU, few position buckets, the tokenizer's special tokens) is written once here. SD3 and HiDream
share a projected CLIP the same way, differing only in width and position count.
"""

from __future__ import annotations


def tiny_t5_encoder(tokenizer, width: int, head_width: int, heads: int = 4):
    """A random ``T5EncoderModel`` of ``width`` hidden units (``heads`` heads of ``head_width``) sized to
    ``tokenizer``'s vocabulary and using its pad / end tokens; seeded by the caller (global RNG)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=head_width, num_layers=2, num_heads=heads,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def tiny_clip_with_projection(tokenizer, width: int, positions: int = 77):
    """A random two-layer ``CLIPTextModelWithProjection`` of ``width`` (projected to the same width) sized
    to ``tokenizer``; ``positions`` is how many tokens it can read (SD3's CLIPs read 77, HiDream's 248).
    Seeded by the caller (global RNG)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=positions, projection_dim=width, hidden_act="gelu",
    ))
