"""A tiny Kolors pipeline: the real classes (diffusers ships Kolors' ChatGLM3 encoder and tokenizer),
wired like Kwai-Kolors/Kolors-diffusers, with tiny sizes.

Like Kolors it has an SDXL-shaped ``UNet2DConditionModel`` (``addition_embed_type="text_time"``)
whose cross-attention input comes through a ``text_proj`` projection from the ChatGLM width
(``encoder_hid_dim``) to ``cross_attention_dim``, a pooled embedding of the ChatGLM width (the last
token of the last layer) plus six micro-conditioning numbers in its added embedding, a ChatGLM3
encoder (RMSNorm, rotary embeddings, left padding) and the Euler scheduler. The ChatGLM width differs
from the UNet's attention width so that skipping the projection fails loudly.

The ChatGLM tokenizer is a SentencePiece model: one is trained here, offline and deterministically,
with the ``sentencepiece`` trainer on the demo captions (whole words become single pieces, any other
text falls back to bytes). The VAE is the project's demo VAE, so the demo data stays learnable.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

#: ChatGLM's width (Kolors: 4096), the UNet's cross-attention width (Kolors: 2048).
CHATGLM_WIDTH = 32
CROSS_ATTENTION_WIDTH = 48
TIME_EMBED_WIDTH = 8
#: SentencePiece vocabulary: 256 byte pieces, the characters and the demo words.
SPM_VOCAB_SIZE = 400

UNET_CONFIG = dict(
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
    encoder_hid_dim_type="text_proj",
    encoder_hid_dim=CHATGLM_WIDTH,
    cross_attention_dim=CROSS_ATTENTION_WIDTH,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_WIDTH,
    projection_class_embeddings_input_dim=6 * TIME_EMBED_WIDTH + CHATGLM_WIDTH,
    norm_num_groups=16,
)

#: Kolors' scheduler folder: Euler with 1100 training timesteps and betas up to 0.014.
SCHEDULER_CONFIG = dict(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
                        steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                        prediction_type="epsilon", use_karras_sigmas=False)


def caption_lines() -> list[str]:
    """Training text for the SentencePiece model: every demo caption, plus the extra prompt words."""
    from simpletuner.testing.shapes import BACKGROUND_NAME, PALETTE, SHAPES
    from simpletuner.testing.tokenizers import DEMO_WORDS

    lines = [f"a {colour} {shape} on a {BACKGROUND_NAME} background" for colour in PALETTE for shape in SHAPES]
    return lines + [" ".join(DEMO_WORDS)] * 4


def sentencepiece_model() -> bytes:
    """A small SentencePiece BPE model trained on :func:`caption_lines` (single-threaded: the same
    bytes on every run). ``<unk>``, ``<s>``, ``</s>`` take ids 0-2 as in ChatGLM3's tokenizer."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_lines()), model_writer=buffer, vocab_size=SPM_VOCAB_SIZE, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        hard_vocab_limit=False, minloglevel=2,
    )
    return buffer.getvalue()


def build_chatglm_tokenizer():
    """A ``ChatGLMTokenizer`` around :func:`sentencepiece_model`. The tokenizer reads its model file
    again when saved, so the file is kept in the temp folder under a content-derived name."""
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    proto = sentencepiece_model()
    file = Path(tempfile.gettempdir()) / f"simpletuner-tiny-chatglm-{hashlib.sha256(proto).hexdigest()[:16]}.model"
    if not file.exists():
        partial = file.with_suffix(f".{id(proto)}.tmp")
        partial.write_bytes(proto)
        partial.replace(file)
    return ChatGLMTokenizer(vocab_file=str(file))


def build_chatglm_encoder(vocab_size: int):
    """A 2-layer ChatGLM3 with seeded weights (``empty_init=False``; its RMSNorm weights, which the
    class leaves uninitialised, set to one)."""
    import torch
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    config = ChatGLMConfig(num_layers=2, padded_vocab_size=vocab_size, hidden_size=CHATGLM_WIDTH,
                           ffn_hidden_size=2 * CHATGLM_WIDTH, kv_channels=8, num_attention_heads=4, seq_length=512,
                           multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
                           original_rope=True, torch_dtype="float32")
    model = ChatGLMModel(config, empty_init=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name or name.endswith("final_layernorm.weight"):
                parameter.fill_(1.0)
    return model


def build_tiny_pipeline(seed: int = 0):
    """``(pipeline, vae_source)``: a seeded ``KolorsPipeline``."""
    import torch
    from diffusers import EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel

    from simpletuner.testing.tiny_models import _demo_vae

    tokenizer = build_chatglm_tokenizer()
    torch.manual_seed(seed)
    text_encoder = build_chatglm_encoder(tokenizer.vocab_size)
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae, vae_source = _demo_vae(seed, 0)
    pipeline = KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG), force_zeros_for_empty_prompt=False)
    return pipeline, vae_source
