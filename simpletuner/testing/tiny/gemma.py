"""A tiny Gemma tokenizer and ``Gemma2Model`` for the tiny pipelines of the Gemma-reading families
(Sana, Lumina 2), built offline.

The tokenizer is a real ``GemmaTokenizer`` (BPE with byte fallback and the ``▁`` word marker, a
``<bos>`` in front of every text) whose vocabulary is built in code: the special tokens, the 256
``<0xNN>`` byte pieces, single characters, and merges learned from the demo words so that each demo
word is one token (captions that differ by one word then differ by one token).
"""

from __future__ import annotations

import json

#: Gemma's special tokens, in the order of the real vocabulary's first ids.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
WORD_MARK = "\u2581"
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()/\n" + WORD_MARK


def _word_merges(words) -> list[tuple[str, str]]:
    """BPE merges (learned by ``tokenizers``' trainer) that turn every ``▁word`` into one symbol."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    marked = sorted({WORD_MARK + word for word in words if word})
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=0, show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator(marked, trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges]


def build_gemma_tokenizer(words=None, model_max_length: int = 4096):
    """A ``GemmaTokenizer`` over the demo words (right padding, as the Sana and Lumina 2 pipelines set)."""
    from transformers import GemmaTokenizer

    from simpletuner.testing.tokenizers import DEMO_WORDS

    merges = _word_merges(DEMO_WORDS if words is None else words)
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *(f"<0x{byte:02X}>" for byte in range(256)), *CHARACTERS,
                  *(left + right for left, right in merges)):
        vocab.setdefault(token, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=model_max_length)
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_gemma2(tokenizer, width: int, layers: int = 2):
    """A random ``Gemma2Model`` of ``width`` hidden units sized to ``tokenizer``; seeded by the caller.

    Eager attention: the default SDPA path of Gemma 2 ignores its logit soft-capping, which the real
    configs set, so eager keeps the tiny model's numbers those of the reference implementation."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2, max_position_embeddings=8192,
        sliding_window=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "eager"
    return Gemma2Model(config)
