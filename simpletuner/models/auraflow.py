"""AuraFlow (fal's v0.1 - v0.3): a rectified-flow transformer of joint (MMDiT) blocks followed by single DiT blocks.

* **Text.** One encoder, UMT5 (Pile-T5-XL in the released models), read like diffusers'
  ``AuraFlowPipeline`` does: ``--tokenizer_max_length`` tokens (256 by default, the pipeline's
  ``max_sequence_length``), padded to that length, encoded with the attention mask, and the padded
  positions multiplied by zero. The transformer takes no text mask: the zeroed padding is what the
  model was trained with. Caption dropout trains with the encoded empty prompt, which is also the
  pipeline's negative prompt. The tokenizer is whatever the checkpoint names (the released models ship
  a Llama-style tokenizer), so it is loaded with ``AutoTokenizer``.
* **Latents.** The SD-style 4-channel VAE posterior (SDXL's VAE in the released models), scaled by
  the VAE's ``scaling_factor``; no shift. The transformer patchifies 2x2 latent cells itself.
* **Objective.** Flow matching (``x_s = (1 - s) x0 + s eps``, target ``eps - x0``); the transformer is
  fed ``s`` in [0, 1] (its timestep embedding multiplies by 1000), as the pipeline feeds ``t / 1000``.
  Without ``--flow_schedule_shift`` the sigmas are shifted by the shift of the checkpoint's own
  scheduler (1.73 for the released models).
* **Resolution.** Position embeddings are a learned square grid of ``sqrt(pos_embed_max_size)``
  patches per side, centre-cropped to the image; larger images do not fit it, and :meth:`AuraFlow.predict`
  says so with the largest edge that does.
* **LoRA.** The default targets are the attention projections of every block (image stream of the
  joint blocks, the joint text+image attention of the single blocks). ``AuraFlowPipeline.save_lora_weights``
  writes ``transformer.<module path>.lora_A/lora_B.weight``, which ``AuraFlowPipeline.load_lora_weights``
  loads and ComfyUI maps for AuraFlow too (``--lora_format comfyui`` adds the ``.alpha`` tensors ComfyUI
  needs when alpha differs from the rank).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import OneTransformerFamily, load_transformer, load_vae

logger = logging.getLogger(__name__)

#: Caption tokens when ``--tokenizer_max_length`` is unset: ``AuraFlowPipeline``'s default length.
DEFAULT_MAX_TOKENS = 256
#: The released checkpoints' scheduler shift, used until the model's own scheduler is read.
RELEASED_SHIFT = 1.73
#: Attention projections of every block: the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def auraflow_text_settings(config) -> dict[str, Any]:
    """The text settings a run uses, with AuraFlow's defaults filled in for unset options."""
    return {"max_tokens": int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS)}


class AuraFlow(OneTransformerFamily, ModelFamily):
    family = "auraflow"
    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_ATTENTION_TARGETS
    #: Replaced in :meth:`load` by the checkpoint scheduler's own shift.
    default_flow_shift = RELEASED_SHIFT
    flow_patch_size = 2
    #: The joint blocks run first, then the single blocks.
    block_list_names = ("joint_transformer_blocks", "single_transformer_blocks")

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_settings = auraflow_text_settings(config)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler

        # the transformer first: a bad single file fails before the text encoder's gigabytes load
        self.transformer = load_transformer(self, AuraFlowTransformer2DModel, "AuraFlow")
        self.tokenizer, self.text_encoder = self._load_text_encoder()
        self.vae = load_vae(self, AutoencoderKL)
        self.adopt_loaded_transformer(FlowMatchEulerDiscreteScheduler)
        self.flow_patch_size = self.transformer.config.patch_size
        self.default_flow_shift = float(self._scheduler.config.get("shift", RELEASED_SHIFT))
        self.freeze_encoders()
        logger.info("auraflow text: %d UMT5 tokens; default flow shift %.2f (the checkpoint scheduler's)",
                    self.text_settings["max_tokens"], self.default_flow_shift)

    def _load_text_encoder(self):
        """The tokenizer the checkpoint names and its UMT5 encoder, from the base model's folders."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        source = self.config_source
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **self.base_source(weights=False))
        encoder = self.load_text_encoder("text_encoder", UMT5EncoderModel, source, subfolder="text_encoder",
                                         dtype=self.weight_dtype, **self.base_source())
        return tokenizer, encoder

    def fingerprint_parts(self) -> dict[str, str]:
        """The caption length changes every cached prompt embedding."""
        return {**super().fingerprint_parts(), "max_tokens": str(self.text_settings["max_tokens"])}

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """UMT5's last hidden states with the padded positions zeroed, exactly as the pipeline encodes."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.text_settings["max_tokens"],
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"prompt_embeds": embeds * mask.unsqueeze(-1).to(embeds.dtype)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """The velocity prediction; the transformer patchifies and unpatchifies the latents itself."""
        self._check_position_grid(noisy_latents)
        return self.denoiser(
            noisy_latents, encoder_hidden_states=text["prompt_embeds"],
            timestep=(timesteps.float() / 1000).to(noisy_latents.dtype), return_dict=False,
        )[0]

    def _check_position_grid(self, latents: torch.Tensor) -> None:
        """Images larger than the learned position grid would index past it (an opaque CUDA / index
        error deep inside diffusers); say which size fits instead."""
        config = self.denoiser.config
        grid = int(config.pos_embed_max_size ** 0.5)
        patches = max(latents.shape[-2:]) // config.patch_size
        if patches > grid:
            scale = self.vae_scale_factor()
            largest = grid * config.patch_size * scale
            raise ValueError(
                f"auraflow: an image edge of {max(latents.shape[-2:]) * scale} px needs {patches} patches, but this "
                f"transformer's learned position grid has {grid} per side; use --resolution (and dataset "
                f"resolutions) of at most {largest} px on the longer edge")

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th block (default: all), joint and single blocks counted in one sequence."""
        blocks = [*self.transformer.joint_transformer_blocks, *self.transformer.single_transformer_blocks]
        return checkpoint_every_nth_block(self.transformer, blocks, interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _components(self, denoiser: torch.nn.Module | None = None) -> dict[str, Any]:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                    transformer=denoiser if denoiser is not None else self.denoiser,
                    scheduler=self._scheduler.__class__.from_config(self._scheduler.config))

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        from diffusers import AuraFlowPipeline

        return AuraFlowPipeline(**self._components(denoiser))

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Validation reads captions at the training length (the pipeline then encodes them exactly
        like :meth:`encode_prompts`)."""
        return {"max_sequence_length": self.text_settings["max_tokens"]}

    def lora_writer_class(self):
        from diffusers import AuraFlowPipeline

        return AuraFlowPipeline
