"""Qwen-Image: a flow transformer (``QwenImageTransformer2DModel``, double-stream MMDiT blocks)
conditioned on the Qwen2.5-VL vision-language model used as a text encoder.

* **Text.** As ``QwenImagePipeline.encode_prompt`` does, a caption is placed in the pipeline's chat
  template (a system prompt asking to describe the image, then the caption as the user turn), run
  through Qwen2.5-VL, and the last layer's hidden states of the caption part are kept: the first
  ``prompt_template_encode_start_idx`` tokens (the system prefix) are dropped. The pipeline pads a
  batch to its longest caption; the cache needs one length, so captions are padded with zero vectors
  to ``--tokenizer_max_length`` (512 by default, the pipeline's ``max_sequence_length``) and the mask
  says which tokens are real. The transformer attends only to masked-in text tokens and places them at
  the same rotary positions whatever the padding, so :meth:`QwenImage.predict` cuts a batch back to
  its longest caption and gets what the pipeline computes. The empty prompt (caption dropout, the
  validation negative prompt) goes through the template too, as the pipeline encodes it.
* **Latents.** The causal 3-D VAE (``AutoencoderKLQwenImage``) encodes an image as a one-frame clip;
  its posterior is normalised per channel, ``(z - latents_mean) / latents_std``, as the pipeline undoes
  before decoding. 8 pixels per latent cell; the pipeline packs 2x2 cells into one token.
* **Objective.** Flow matching in the usual convention: the transformer takes ``sigma`` (``t / 1000``)
  and predicts ``eps - x0``, exactly what the pipeline's Euler steps use. The default shift is the
  shipped sampler's at the training resolution (``exp(mu)`` of its dynamic shift).
* **LoRA.** The attention projections of both streams in every block (``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``, ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``), written by
  ``QwenImagePipeline.save_lora_weights`` (``transformer.<module path>.lora_A/lora_B``, the adapter
  config as metadata), which ``QwenImagePipeline.load_lora_weights`` reads. ``--lora_format comfyui``
  writes the same names plus ``.alpha`` tensors, which ComfyUI's Qwen-Image key map takes; diffusers
  does not read that file (its converter adds the ``transformer.`` prefix twice when alphas are present).
* **Validation.** ``QwenImagePipeline``, whose classifier-free guidance is ``true_cfg_scale`` with a
  negative prompt: ``--validation_guidance`` is passed as that scale, with the empty prompt as the
  negative when none is set (:class:`QwenImageValidationPipeline`).
* **Edit flavours.** Qwen-Image-Edit reads reference images through the encoder's vision tower; they
  are refused at config time (``FamilyInfo.refused_flavours``) until that conditioning is cached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import QwenImagePipeline

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import (
    DynamicShiftLine,
    OneFrameClipLatents,
    OneTransformerFamily,
    component_source,
    load_transformer,
    load_vae,
    sampler_resolution_shift,
)

logger = logging.getLogger(__name__)

#: Caption tokens when ``--tokenizer_max_length`` is unset: the pipeline's default ``max_sequence_length``.
DEFAULT_MAX_TOKENS = 512
#: The dynamic-shift line of the pipeline's ``calculate_shift`` when the scheduler config leaves it out.
SHIFT_LINE = DynamicShiftLine(base_seq_len=256, max_seq_len=4096, base_mu=0.5, max_mu=1.15)
#: Attention projections of the image and the text stream of every block: the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"]
#: Guidance the Qwen-Image model card samples with (``true_cfg_scale``).
DEFAULT_VALIDATION_GUIDANCE = 4.0


def refuse_edit_checkpoint(source: str) -> None:
    """A local Qwen-Image-Edit folder (``model_index.json`` names an edit pipeline) is refused like the
    edit flavours: its transformer expects reference-image tokens next to the noisy ones, which this
    family does not feed, so training it as text-to-image would quietly teach it the wrong task."""
    import json

    index = Path(source) / "model_index.json"
    if not index.is_file():
        return
    pipeline_class = str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    if pipeline_class.startswith("QwenImageEdit"):
        raise ValueError(f"{source}: this is a Qwen-Image-Edit checkpoint ({pipeline_class}), which reads reference "
                         "images through the text encoder's vision tower; qwen_image trains the text-to-image model "
                         "only for now, so point --pretrained_model_name_or_path at a Qwen-Image (QwenImagePipeline) "
                         "folder")


class QwenImageValidationPipeline(QwenImagePipeline):
    """``QwenImagePipeline`` that reads ``guidance_scale`` as classifier-free guidance.

    Why: the validation runner passes ``guidance_scale`` to every pipeline; Qwen-Image's ignores it
    (it is for guidance-distilled checkpoints) and runs CFG only with ``true_cfg_scale`` above 1 *and*
    a negative prompt. Without this the configured guidance would silently do nothing. Only used for
    sampling; saved pipelines are the stock class."""

    def __call__(self, prompt=None, negative_prompt=None, guidance_scale: float | None = None, **kwargs):
        scale = 1.0 if guidance_scale is None else float(guidance_scale)
        if scale > 1.0 and negative_prompt is None and kwargs.get("negative_prompt_embeds") is None:
            count = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
            negative_prompt = [""] * count  # the empty prompt caption dropout trains
        return super().__call__(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=scale, **kwargs)


class QwenImage(OneFrameClipLatents, OneTransformerFamily, ModelFamily):
    family = "qwen_image"
    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_ATTENTION_TARGETS
    #: Replaced in :meth:`load` by the shipped sampler's shift at the training resolution.
    default_flow_shift = 1.0
    flow_patch_size = 2

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.max_tokens = int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

        refuse_edit_checkpoint(self.config_source)
        self.transformer = load_transformer(self, QwenImageTransformer2DModel, "Qwen-Image")
        self.tokenizer, self.text_encoder = self._load_text_encoder()
        self.vae = load_vae(self, AutoencoderKLQwenImage)
        self.adopt_loaded_transformer(FlowMatchEulerDiscreteScheduler)
        template = self._pipeline()  # the pipeline's own template, so training and inference agree
        self.prompt_template = template.prompt_template_encode
        self.template_prefix_tokens = int(template.prompt_template_encode_start_idx)
        self.freeze_encoders()
        self.default_flow_shift = sampler_resolution_shift(self, self._scheduler.config, SHIFT_LINE)
        logger.info("qwen_image text: up to %d Qwen2.5-VL tokens after the pipeline's template; default flow "
                    "shift %.3f", self.max_tokens, self.default_flow_shift)

    def _load_text_encoder(self):
        """Qwen2.5-VL's tokenizer and model from the base model's ``tokenizer`` / ``text_encoder`` folders,
        in the run's weight dtype, through :meth:`load_text_encoder` (so ``--text_encoder_1_precision``
        and pipeline quantization reach it)."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        source = self.config_source
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **self.base_source(weights=False))
        path, folder = component_source(source, "text_encoder")
        encoder = self.load_text_encoder("text_encoder", Qwen2_5_VLForConditionalGeneration, path, subfolder=folder,
                                         dtype=self.weight_dtype, **self.base_source())
        tokenizer.padding_side = "right"  # the pipeline's; real tokens then form a prefix of every row
        return tokenizer, encoder

    def fingerprint_parts(self) -> dict[str, str]:
        """The caption length changes every cached prompt embedding."""
        return {**super().fingerprint_parts(), "max_tokens": str(self.max_tokens)}

    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: one spatial halving per entry of the VAE's ``temperal_downsample``
        (the rule the pipeline itself uses)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Last-layer hidden states of the caption part of the templated prompts, padded with zeros to
        ``max_tokens``, and the 0/1 mask of real tokens."""
        texts = [self.prompt_template.format(prompt) for prompt in prompts]
        skip = self.template_prefix_tokens
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_tokens + skip, truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        embeds, caption_mask = hidden[:, skip:], mask[:, skip:]
        embeds = embeds * caption_mask.unsqueeze(-1).to(embeds.dtype)  # the pipeline pads with zero vectors
        return {"prompt_embeds": embeds, "prompt_embeds_mask": caption_mask}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """Pack the latents into 2x2-cell tokens, run the transformer at ``sigma = t / 1000`` on the
        batch's captions cut to the longest one, unpack its ``eps - x0`` prediction."""
        count, channels, height, width = noisy_latents.shape
        # the cached mask arrives cast to the weight dtype; the transformer wants booleans
        mask = text["prompt_embeds_mask"] > 0.5
        length = max(int(mask.sum(dim=1).max()), 1)
        tokens = QwenImagePipeline._pack_latents(noisy_latents, count, channels, height, width)
        output = self.denoiser(
            hidden_states=tokens, timestep=(timesteps.float() / 1000).to(noisy_latents.dtype),
            encoder_hidden_states=text["prompt_embeds"][:, :length], encoder_hidden_states_mask=mask[:, :length],
            img_shapes=[[(1, height // 2, width // 2)]] * count, return_dict=False,
        )[0]
        return output.view(count, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            count, channels, height, width)

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th block (default: all) in the backward pass."""
        return checkpoint_every_nth_block(self.denoiser, list(self.denoiser.transformer_blocks), interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _pipeline(self, denoiser: torch.nn.Module | None = None,
                  pipeline_class: type[QwenImagePipeline] = QwenImagePipeline) -> QwenImagePipeline:
        return pipeline_class(transformer=denoiser if denoiser is not None else self.denoiser,
                              scheduler=self._scheduler.__class__.from_config(self._scheduler.config),
                              vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer)

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        return self._pipeline(denoiser, QwenImageValidationPipeline)

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """The caption length used in training."""
        return {"max_sequence_length": self.max_tokens}

    def validation_defaults(self) -> dict[str, Any]:
        """Unless set: the model card's guidance and the empty negative prompt caption dropout trains."""
        return {"validation_guidance": DEFAULT_VALIDATION_GUIDANCE, "validation_negative_prompt": ""}

    def lora_writer_class(self):
        return QwenImagePipeline

    def saved_pipeline(self, denoiser: torch.nn.Module):
        """The stock ``QwenImagePipeline``, not the validation subclass."""
        return self._pipeline(denoiser)
