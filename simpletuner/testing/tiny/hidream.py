"""A tiny HiDream-I1 pipeline: the real classes, wired like HiDream-ai/HiDream-I1-Full, with tiny sizes.

Like the released model it has a ``HiDreamImageTransformer2DModel`` with dual-stream blocks followed by
single-stream blocks, a mixture-of-experts feed-forward in every block (a learned router picks two of
four experts per token, beside a shared expert), and four text encoders:

* two ``CLIPTextModelWithProjection`` of *different* widths whose projected embeddings, concatenated,
  are the pooled embedding (the real ones are long-context CLIPs: more than 77 positions, because the
  pipeline feeds them up to 128 tokens);
* a T5 encoder (the last hidden states, one caption projection);
* a ``LlamaForCausalLM`` whose per-layer hidden states feed the blocks: the transformer's
  ``llama_layers`` names one Llama layer per block. Here three Llama layers of which the blocks read
  layers 1 and 2 only, so a cache that kept the wrong layers fails loudly.

The Llama tokenizer is a byte-level BPE ``PreTrainedTokenizerFast`` (what Llama 3.1 ships), built in code.
The VAE is a 16-channel one with FLUX.1's ``shift_factor`` / ``scaling_factor`` (HiDream decodes with
FLUX.1's VAE) and four stages, 8 pixels per latent cell. ``max_resolution`` (16x16 latent cells) bounds
the tokens of a non-square image to 64 (a 128 px square's worth).
"""

from __future__ import annotations

from simpletuner.testing.tiny.vae import four_stage_vae_config

CLIP_L_WIDTH, CLIP_G_WIDTH = 32, 48
T5_WIDTH = 40
LLAMA_WIDTH = 24
LLAMA_LAYERS = 3
#: The Llama hidden state each block reads (1 dual-stream + 2 single-stream blocks).
BLOCK_LLAMA_LAYERS = (1, 2, 2)
#: Tokens the pipeline feeds each encoder by default (its ``max_sequence_length``).
MAX_TOKENS = 128

TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_channels=[T5_WIDTH, LLAMA_WIDTH],
    text_emb_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=(4, 2, 2),  # sums to the head width
    max_resolution=(16, 16),  # latent cells: non-square images up to 64 tokens (128 px area)
    llama_layers=list(BLOCK_LLAMA_LAYERS),
)

#: FLUX.1's VAE, which HiDream uses
VAE_CONFIG = four_stage_vae_config(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)

#: HiDream-I1-Full's sampler shift.
SCHEDULER_SHIFT = 3.0
BEGIN_TOKEN, END_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"


def build_llama_tokenizer(words=None, model_max_length: int = MAX_TOKENS):
    """A byte-level BPE ``PreTrainedTokenizerFast`` like Llama 3.1's (``<|begin_of_text|>`` in front of
    every text), whose merges make each demo word one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from simpletuner.testing.tokenizers import DEMO_WORDS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BEGIN_TOKEN, END_TOKEN])
    texts = sorted(set(DEMO_WORDS if words is None else words))
    tokenizer.train_from_iterator([*texts, *(" " + word for word in texts)], trainer=trainer)
    begin = tokenizer.token_to_id(BEGIN_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BEGIN_TOKEN} $A",
                                                             special_tokens=[(BEGIN_TOKEN, begin)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BEGIN_TOKEN, eos_token=END_TOKEN,
                                   pad_token=END_TOKEN, model_max_length=model_max_length)


def tiny_llama(tokenizer, width: int = LLAMA_WIDTH, layers: int = LLAMA_LAYERS):
    """A random ``LlamaForCausalLM`` sized to ``tokenizer`` (grouped-query attention like Llama 3.1);
    seeded by the caller."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``HiDreamImagePipeline`` seeded by ``seed``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )

    from simpletuner.testing.tiny.text_encoders import tiny_clip_with_projection, tiny_t5_encoder
    from simpletuner.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer(model_max_length=248)
    tokenizer_2 = build_clip_tokenizer(model_max_length=248)
    tokenizer_3 = build_t5_tokenizer(model_max_length=MAX_TOKENS)
    tokenizer_4 = build_llama_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_clip_with_projection(tokenizer, CLIP_L_WIDTH, positions=248)
    torch.manual_seed(seed + 1)
    text_encoder_2 = tiny_clip_with_projection(tokenizer_2, CLIP_G_WIDTH, positions=248)
    torch.manual_seed(seed + 2)
    text_encoder_3 = tiny_t5_encoder(tokenizer_3, T5_WIDTH, head_width=10)
    torch.manual_seed(seed + 3)
    text_encoder_4 = tiny_llama(tokenizer_4)
    torch.manual_seed(seed + 4)
    transformer = HiDreamImageTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 5)
    vae = AutoencoderKL(**VAE_CONFIG)
    pipeline = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4, tokenizer_4=tokenizer_4, transformer=transformer,
    )
    return pipeline, "random (tiny FLUX.1-shaped VAE)"
