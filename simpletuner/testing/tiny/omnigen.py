"""A tiny OmniGen pipeline: the real classes, shaped like OmniGen v1, with tiny sizes.

OmniGen has no text encoder: its ``OmniGenTransformer2DModel`` is a Phi-3-style decoder that embeds the
prompt tokens itself (``embed_tokens``) and runs text, a time token and the image patches through one
stack of blocks, with rotary position embeddings scaled the "su" way (short and long factors).
Like the released model the tiny one has a Llama-style SentencePiece tokenizer with Phi-3's chat tokens
(``<|user|>``, ``<|assistant|>``, ``<|end|>``, and ``<|endoftext|>`` as padding), a 4-channel SD-style VAE
with SDXL's scaling factor and the scheduler the converted checkpoint ships: flow-matching Euler with
inverted sigmas on a [0, 1] clock (0 is pure noise, 1 the clean image).

The VAE downsamples 8x like SDXL's: diffusers' OmniGen processor counts one image token per 16x16
pixels (8x VAE, 2x2 patches) when it lays out the attention mask, so a 4x tiny VAE (the demo VAE) would
not fit the pipeline.
"""

from __future__ import annotations

from simpletuner.testing.tiny.vae import four_stage_vae_config

#: Phi-3's chat tokens the OmniGen prompt template uses, plus its padding token.
CHAT_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>")
PAD_TOKEN = "<|endoftext|>"
#: The words of the pipeline's instruction prefix, merged into single tokens so the template stays short.
TEMPLATE_WORDS = ("Generate", "an", "image", "according", "to", "the", "following", "instructions")
#: The transformer's width; 4 heads of 8, as many key/value heads (OmniGen v1 has 32 of each).
WIDTH = 32
HEADS = 4

#: The released checkpoint's rotary "su" scaling has one short and one long factor per frequency pair;
#: the tiny ones differ from each other and from 1 so a mix-up of the two shows.
ROPE_SCALING = {
    "short_factor": [1.0, 1.1, 1.25, 1.5],
    "long_factor": [1.0, 2.0, 4.0, 8.0],
    "type": "su",
}


#: An SD-style VAE of 4 levels (8 pixels per latent cell, as the pipeline assumes), with SDXL's scaling.
VAE_CONFIG = four_stage_vae_config(latent_channels=4, scaling_factor=0.13025, quant_convs=True)


def build_phi3_tokenizer(words=None, model_max_length: int = 4096):
    """A ``LlamaTokenizer`` (BPE with byte fallback and ``▁`` word marks, ``<s>`` in front of every text)
    with Phi-3's chat tokens, whose merges make each demo word (and each word of the OmniGen instruction
    prefix) one token."""
    from transformers import LlamaTokenizer

    from simpletuner.testing.tiny.gemma import CHARACTERS, _word_merges
    from simpletuner.testing.tokenizers import DEMO_WORDS

    merges = _word_merges([*(DEMO_WORDS if words is None else words), *TEMPLATE_WORDS])
    vocab: dict[str, int] = {}
    for token in ("<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *CHARACTERS,
                  *(left + right for left, right in merges)):
        vocab.setdefault(token, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def transformer_config(tokenizer) -> dict:
    """The tiny transformer's config, sized to ``tokenizer``."""
    return dict(
        in_channels=4,
        patch_size=2,
        hidden_size=WIDTH,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=2 * WIDTH,
        num_layers=2,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        original_max_position_embeddings=512,
        rope_scaling=ROPE_SCALING,
        pos_embed_max_size=32,  # a 32x32 grid of 2x2 patches: images up to 512 px at the VAE's scale of 8
        time_step_dim=32,
    )


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight OmniGen pipeline seeded by ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenTransformer2DModel

    from simpletuner.models.omnigen import OmniGenTextPipeline

    tokenizer = build_phi3_tokenizer()
    torch.manual_seed(seed + 1)
    transformer = OmniGenTransformer2DModel(**transformer_config(tokenizer))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE_CONFIG)
    # diffusers' OmniGenPipeline needs torchvision to be built; ours is the same pipeline with a text-only
    # processor, and its saved folder names OmniGenPipeline
    pipeline = OmniGenTextPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1),
        vae=vae,
        tokenizer=tokenizer,
    )
    return pipeline, "random (tiny SDXL-shaped VAE)"
