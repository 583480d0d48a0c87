"""A tiny Qwen-Image pipeline: the real classes, wired like Qwen/Qwen-Image, with tiny sizes.

Like the real model it has a ``QwenImageTransformer2DModel`` (double-stream MMDiT blocks, 16 latent
channels packed 2x2 into 64 input channels, a 3-axis rotary embedding), a Qwen2.5-VL text encoder
(``Qwen2_5_VLForConditionalGeneration`` with a tiny vision tower that the text-to-image path never
runs, and multimodal rotary sections that add up to the head width) whose width differs from the
transformer's, the Wan-style causal 3-D VAE (``AutoencoderKLQwenImage``, 8 pixels per latent cell,
Qwen-Image's per-channel ``latents_mean`` / ``latents_std``) and the flow-matching Euler scheduler with
the shipped dynamic-shift settings.

The tokenizer is a real byte-level BPE ``Qwen2Tokenizer`` whose merges make every demo word and every
word of the pipeline's prompt template one token. That matters: the pipeline drops the first 34
tokens of the encoded template (``prompt_template_encode_start_idx``, the length of the system prefix
in the real vocabulary), so the tiny vocabulary must tokenize that prefix into exactly 34 tokens too.
"""

from __future__ import annotations

#: The text encoder's width; the transformer's ``joint_attention_dim`` reads it.
QWEN_WIDTH = 32
#: What the pipeline's prompt template puts in front of the caption (its system prefix).
TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape",
                  "size", "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and",
                  "background")
#: Special tokens of the real Qwen2.5-VL vocabulary the chat template and the vision path name.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=64,  # 16 latent channels x a 2x2 patch
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=QWEN_WIDTH,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),  # sums to the head width
)

VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],  # three spatial downsamples: 8 pixels per latent cell, as the pipeline assumes
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)

#: Qwen/Qwen-Image's scheduler/scheduler_config.json (dynamic shift, exponential time shift, terminal 0.02).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


def build_qwen_tokenizer(words=None):
    """A ``Qwen2Tokenizer`` (byte-level BPE, Qwen's special tokens) over the demo and template words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from simpletuner.testing.tokenizers import DEMO_WORDS

    vocabulary_words = sorted(set(DEMO_WORDS if words is None else words) | set(TEMPLATE_WORDS))
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=0, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # each word alone and after a space, so both ``word`` and ``Ġword`` become one symbol
    trainer_model.train_from_iterator([text for word in vocabulary_words for text in (word, f" {word}")],
                                      trainer=trainer)
    learned = trainer_model.get_vocab()
    vocab = dict(sorted(learned.items(), key=lambda item: item[1]))
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    import json

    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
              for merge in json.loads(trainer_model.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_qwen25_vl(tokenizer, width: int = QWEN_WIDTH, layers: int = 2):
    """A random ``Qwen2_5_VLForConditionalGeneration`` sized to ``tokenizer``; seeded by the caller.

    The text model has grouped-query attention and Qwen2.5-VL's multimodal rotary sections (which must
    add up to half the head width); the vision tower is tiny, since prompts never carry images here."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 2
    head_width = width // heads
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    section = head_width // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": [section - 2 * (section // 3), section // 3, section // 3]},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a random-weight ``QwenImagePipeline`` seeded by ``seed``."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_qwen25_vl(tokenizer)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(**VAE_CONFIG)
    pipeline = QwenImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                                 vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    return pipeline, "random (tiny Qwen-Image-shaped 3-D VAE)"
