"""Tokenizers built entirely offline, for the tiny test and demo models.

A CLIP tokenizer needs a vocabulary and BPE merges. Hub files are not available here, so we build
them in code: the 256 byte symbols (alone and with the ``</w>`` end-of-word marker) so that any text
can be tokenized, plus merges *learned* from a small word list so that the words the demo uses
("red", "circle", "background", ...) become single tokens. One token per word gives the random text
encoder clearly different inputs for captions that differ by one word.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Iterable

from simpletuner.testing.shapes import BACKGROUND_NAME, PALETTE, SHAPES

#: Words that become single tokens: the demo captions plus a few common prompt words.
DEMO_WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "of", "in", "and", "with", "background", "photo", "picture",
    BACKGROUND_NAME, *PALETTE, *SHAPES, "black", "grey", "gray", "orange", "pink", "brown",
    "small", "large", "big", "shape", "blurry", "cropped", "ugly", "dog", "cat",
)
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """The printable stand-ins GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return tuple(chr(c) for c in codes)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges, learned by the ``tokenizers`` library's ``BpeTrainer``, until every word is one symbol.

    The trainer marks word ends with ``</w>`` as CLIP does, and with no vocabulary limit it merges
    until no pair is left, so replaying the merges in rank order (what ``CLIPTokenizer`` does) turns
    each listed word into exactly one token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    unique = sorted({w for w in words if w})
    if not unique:
        return []
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=0, show_progress=False,
                                  end_of_word_suffix="</w>", special_tokens=[])
    tokenizer.train_from_iterator(unique, trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges]


def build_clip_tokenizer(words: Iterable[str] = DEMO_WORDS, model_max_length: int = 77):
    """A real ``CLIPTokenizer`` whose vocabulary is bytes + the merged symbols for ``words``."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    merges = learn_merges(words)
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    vocab[START_TOKEN] = len(vocab)
    vocab[END_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tokenizer


def build_t5_tokenizer(words: Iterable[str] = DEMO_WORDS, model_max_length: int = 32, extra_ids: int = 100):
    """A real ``T5Tokenizer`` (SentencePiece Unigram) built from an in-code vocabulary.

    The pieces are T5's specials (``<pad>``, ``</s>``, ``<unk>``), every word of ``words`` as one
    ``▁word`` piece (scored higher so it wins over spelling the word out), and single characters
    (with and without the ``▁`` word-start marker) so any text still tokenizes. Used by the tiny
    SD3, Flux, PixArt and DeepFloyd models.
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {piece for piece, _ in pieces}
    for word in words:
        piece = "\u2581" + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -1.0))
    characters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
    for character in characters:
        for piece in (character, "\u2581" + character):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    if "\u2581" not in seen:
        pieces.append(("\u2581", -5.0))
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=model_max_length)
