"""The Gemma text encoder that Sana and Lumina 2 share.

Both pipelines read captions through a Gemma 2 decoder used as an encoder: the prompt is tokenized
with right padding to a fixed length, run through ``Gemma2Model`` with its attention mask, and the
hidden states of one layer (Sana: the last, Lumina 2: the second to last) become the transformer's
text tokens, with the mask cached next to them so padded tokens stay out of cross-attention.

Loading follows the other per-component overrides (:func:`simpletuner.models.components.component_source`):
``--pretrained_gemma_model_name_or_path`` may be a pipeline folder (with ``tokenizer/`` and
``text_encoder/``), a plain Gemma folder, or a hub id; without it both come from the base model. The
encoder goes through :meth:`ModelFamily.load_text_encoder`, so ``--text_encoder_1_precision`` and
``--quantize_via pipeline`` reach it like any other text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from simpletuner.models.components import component_source

if TYPE_CHECKING:
    from simpletuner.models.base import ModelFamily


@dataclass(frozen=True)
class GemmaText:
    """One batch of encoded prompts: hidden states [B, T, width] and the 0/1 attention mask [B, T]."""

    embeds: torch.Tensor
    mask: torch.Tensor


def gemma_source(family: "ModelFamily") -> str:
    """Where the Gemma tokenizer and encoder come from (for messages and cache keys)."""
    return str(family.config.pretrained_gemma_model_name_or_path or family.config_source)


def load_gemma(family: "ModelFamily"):
    """``(tokenizer, encoder)``: Gemma's tokenizer and ``Gemma2Model`` in the run's weight dtype, from
    ``--pretrained_gemma_model_name_or_path`` or else the base model's ``tokenizer``/``text_encoder``."""
    from transformers import AutoTokenizer, Gemma2Model

    override = family.config.pretrained_gemma_model_name_or_path
    if override:
        path, encoder_folder = component_source(override, "text_encoder")
        _, tokenizer_folder = component_source(override, "tokenizer")
        # a plain Gemma folder has no subfolders; AutoTokenizer refuses an explicit subfolder=None
        tokenizer = AutoTokenizer.from_pretrained(path, **_inside(tokenizer_folder))
        encoder = family.load_text_encoder("text_encoder", Gemma2Model, path, dtype=family.weight_dtype,
                                           **_inside(encoder_folder))
    else:
        source = family.config_source
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **family.base_source(weights=False))
        encoder = family.load_text_encoder("text_encoder", Gemma2Model, source, subfolder="text_encoder",
                                           dtype=family.weight_dtype, **family.base_source())
    tokenizer.padding_side = "right"  # both pipelines pad on the right; the mask then marks the tail
    return tokenizer, encoder


def _inside(folder: str | None) -> dict[str, str]:
    """``subfolder=folder`` when there is one."""
    return {"subfolder": folder} if folder else {}


def encode_with_gemma(tokenizer, encoder, texts: list[str], max_length: int, device: torch.device,
                      hidden_layer: int = -1) -> GemmaText:
    """Hidden states of ``hidden_layer`` for ``texts`` padded (and cut) to ``max_length`` tokens, the
    way the Sana and Lumina 2 pipelines call Gemma (the mask is passed into the encoder too)."""
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    wants_all_layers = hidden_layer != -1
    output = encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=wants_all_layers)
    embeds = output.hidden_states[hidden_layer] if wants_all_layers else output[0]
    return GemmaText(embeds=embeds, mask=mask)
