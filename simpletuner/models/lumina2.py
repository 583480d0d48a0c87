"""Lumina-Image 2.0: a flow transformer (``Lumina2Transformer2DModel``, a Next-DiT with caption and
noise refiner blocks) conditioned on a Gemma 2 text encoder.

* **Text.** Gemma's *second to last* hidden states (:mod:`simpletuner.models.gemma`) for
  ``--tokenizer_max_length`` tokens (256 by default, the pipeline's length) plus their attention mask.
  As ``Lumina2Pipeline.encode_prompt`` does, a caption is read as ``<system prompt> <Prompt Start>
  <caption>`` (the pipeline's own system prompt); the empty prompt (caption dropout, the negative
  prompt) is encoded bare, exactly as the pipeline encodes its negative prompt.
* **Latents.** The 16-channel FLUX.1 VAE's posterior, ``(z - shift_factor) * scaling_factor``. The
  pipeline assumes 8 pixels per latent cell; the transformer patches 2x2 cells into one token.
* **Objective.** Flow matching (``x_s = (1 - s) x0 + s eps``, target ``eps - x0``). Lumina 2 counts time
  the other way round: its transformer takes ``1 - s`` and predicts ``x0 - eps``, which the pipeline
  negates before stepping. :meth:`Lumina2.predict` does the same conversion in both directions, so
  the shared loss and sampler see the usual convention. The default shift is the shipped sampler's at
  the training resolution (its fixed ``shift``, or ``exp(mu)`` for a dynamic-shift scheduler).
* **LoRA.** Attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of every block, refiners
  included, written by ``Lumina2Pipeline.save_lora_weights``
  (``transformer.<module path>.lora_A/lora_B.weight``), which ``Lumina2Pipeline.load_lora_weights`` reads.
* **Validation.** The stock ``Lumina2Pipeline`` (classifier-free guidance with its norm rescaling) with
  the caption length used in training.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import Lumina2Pipeline

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import (
    DynamicShiftLine,
    OneTransformerFamily,
    load_transformer,
    load_vae,
    sampler_resolution_shift,
)
from simpletuner.models.gemma import encode_with_gemma, gemma_source, load_gemma

logger = logging.getLogger(__name__)

#: Caption tokens when ``--tokenizer_max_length`` is unset: the pipeline's ``max_sequence_length``.
DEFAULT_MAX_TOKENS = 256
#: Gemma's layer whose hidden states are the text tokens (the pipeline's ``hidden_states[-2]``).
GEMMA_LAYER = -2
#: What the pipeline puts between the system prompt and the caption.
PROMPT_START = " <Prompt Start> "
#: The dynamic-shift line of the pipeline's ``calculate_shift`` when the scheduler config leaves it out.
SHIFT_LINE = DynamicShiftLine(base_seq_len=256, max_seq_len=4096, base_mu=0.5, max_mu=1.15)
#: Attention projections of every block (main layers and both refiners): the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class Lumina2(OneTransformerFamily, ModelFamily):
    family = "lumina2"
    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_ATTENTION_TARGETS
    #: Replaced in :meth:`load` by the shipped sampler's shift at the training resolution.
    default_flow_shift = 6.0
    flow_patch_size = 2

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.max_tokens = int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel

        self.transformer = load_transformer(self, Lumina2Transformer2DModel, "Lumina 2")
        self.tokenizer, self.text_encoder = load_gemma(self)
        self.vae = load_vae(self, AutoencoderKL)
        self.adopt_loaded_transformer(FlowMatchEulerDiscreteScheduler)
        self.flow_patch_size = int(self.transformer.config.patch_size)
        self.system_prompt = self._pipeline().system_prompt  # the pipeline's own, so training and inference agree
        self.freeze_encoders()
        self.default_flow_shift = sampler_resolution_shift(self, self._scheduler.config, SHIFT_LINE)
        logger.info("lumina2 text: %d Gemma tokens after the pipeline's system prompt; default flow shift %.3f",
                    self.max_tokens, self.default_flow_shift)

    def fingerprint_parts(self) -> dict[str, str]:
        """The Gemma source and the caption length change every cached prompt embedding."""
        return {**super().fingerprint_parts(), "gemma": gemma_source(self), "max_tokens": str(self.max_tokens)}

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Gemma's second to last hidden states and mask, as the pipeline makes them: the system prompt
        in front of a caption, the empty prompt (the pipeline's negative prompt) bare."""
        texts = [f"{self.system_prompt}{PROMPT_START}{prompt}" if prompt else "" for prompt in prompts]
        text = encode_with_gemma(self.tokenizer, self.text_encoder, texts, self.max_tokens, self.device,
                                 hidden_layer=GEMMA_LAYER)
        return {"prompt_embeds": text.embeds, "prompt_attention_mask": text.mask}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """``eps - x0`` at noise level ``s = timesteps / 1000``: the transformer is asked at its own time
        ``1 - s`` and its ``x0 - eps`` answer is negated, as the pipeline does."""
        # the cached mask arrives cast to the weight dtype; the transformer counts caption tokens from it
        mask = (text["prompt_attention_mask"] > 0.5).long()
        own_time = 1 - timesteps.float() / self._scheduler.config.num_train_timesteps
        output = self.denoiser(hidden_states=noisy_latents, timestep=own_time.to(noisy_latents.dtype),
                               encoder_hidden_states=text["prompt_embeds"], encoder_attention_mask=mask,
                               return_dict=False)[0]
        return -output

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th main block (default: all; the refiners are not checkpointed,
        as in diffusers) in the backward pass."""
        return checkpoint_every_nth_block(self.denoiser, list(self.denoiser.layers), interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _pipeline(self, denoiser: torch.nn.Module | None = None) -> Lumina2Pipeline:
        return Lumina2Pipeline(transformer=denoiser if denoiser is not None else self.denoiser,
                               scheduler=self._scheduler.__class__.from_config(self._scheduler.config),
                               vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer)

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        return self._pipeline(denoiser)

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """The caption length used in training."""
        return {"max_sequence_length": self.max_tokens}

    def validation_defaults(self) -> dict[str, Any]:
        """No negative prompt unless set: the pipeline's negative is the empty prompt, which caption
        dropout trains."""
        return {"validation_negative_prompt": ""}

    def lora_writer_class(self):
        return Lumina2Pipeline
