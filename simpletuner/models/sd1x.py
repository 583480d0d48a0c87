"""Stable Diffusion 1.x and 2.x: a UNet2DConditionModel conditioned on one CLIP text encoder.

SD 1.x predicts noise (epsilon); SD 2.x (768 px models) predicts velocity (v-prediction). Both share
everything else, so SD 2.x is this class with a different catalogue entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ModelFamily
from simpletuner.objectives.targets import configure_training_scheduler, inference_scheduler_overrides

logger = logging.getLogger(__name__)

#: Attention projections of every transformer block: the usual LoRA target for SD UNets.
UNET_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class StableDiffusion1x(ModelFamily):
    family = "sd1x"
    denoiser_name = "unet"

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if self.is_single_file():
            self._load_single_file()
        else:
            source = dict(revision=self.config.revision)
            path = self.model_path
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **source)
            self.text_encoder = self.load_text_encoder("text_encoder", CLIPTextModel, path, subfolder="text_encoder",
                                                       variant=self.config.variant, **source)
            self.unet = self.load_denoiser(UNet2DConditionModel, path, subfolder="unet", variant=self.config.variant,
                                           **source)
            self.vae = self.load_vae(path)
            self._scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **source)
        self._checkpoint_prediction_type = self._scheduler.config.get("prediction_type")
        self._scheduler.register_to_config(prediction_type=self.prediction_type)
        self._scheduler = configure_training_scheduler(self._scheduler, self.config)  # spacing, zero terminal SNR
        self.place_in_weight_dtype([self.text_encoder, self.vae, self.unet], vae=self.vae)
        self.denoiser = self.unet
        self.freeze_encoders()

    def _load_single_file(self) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        pipeline = self.load_single_file_pipeline(StableDiffusionPipeline)
        self.tokenizer, self.text_encoder = pipeline.tokenizer, pipeline.text_encoder
        self.unet = pipeline.unet
        self.vae = self.load_vae(self.model_path) if self.config.pretrained_vae_model_name_or_path else pipeline.vae
        self._scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    def default_prediction_type(self) -> str:
        """What the checkpoint's own scheduler says (SD 2.x "-base" models are epsilon, the 768 px
        ones v-prediction); the family default only when the checkpoint does not say."""
        shipped = getattr(self, "_checkpoint_prediction_type", None)
        return shipped if shipped in self.info.prediction_types else super().default_prediction_type()

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.vae]

    def noise_scheduler(self):
        return self._scheduler

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.text_conditioning(prompts)

    def text_conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return {"prompt_embeds": hidden}

    def trainable_text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        return self.denoiser(noisy_latents, timesteps, encoder_hidden_states=text["prompt_embeds"], return_dict=False)[0]

    # --- validation and outputs ------------------------------------------------------------------------

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        scheduler = DDIMScheduler.from_config(self._scheduler.config, **inference_scheduler_overrides(self.config))
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            unet=denoiser if denoiser is not None else self.denoiser, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    # --- ControlNet (--controlnet; models/controlnet.py) ----------------------------------------------

    def controlnet_from_denoiser(self, overrides: dict[str, Any] | None) -> torch.nn.Module:
        """diffusers' ``ControlNetModel.from_unet`` layout (models/controlnet.py), ``overrides`` on top,
        weights from the UNet."""
        from diffusers import ControlNetModel

        from simpletuner.models.controlnet import new_controlnet, unet_controlnet_layout

        layout = unet_controlnet_layout(self.unet, self.vae_scale_factor())
        return new_controlnet(ControlNetModel, layout, self.unet, overrides)

    def controlnet_predict(self, controlnet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           text: dict[str, torch.Tensor], control_pixels: torch.Tensor,
                           batch: dict | None = None) -> torch.Tensor:
        """The pipeline feeds the control image in [0, 1] (its control processor does not normalise)."""
        hidden = text["prompt_embeds"]
        control = ((control_pixels + 1) / 2).to(noisy_latents.device, controlnet.dtype)
        down, mid = controlnet(noisy_latents.to(controlnet.dtype), timesteps,
                               encoder_hidden_states=hidden.to(controlnet.dtype), controlnet_cond=control,
                               return_dict=False)
        dtype = noisy_latents.dtype
        return self.denoiser(noisy_latents, timesteps, encoder_hidden_states=hidden,
                             down_block_additional_residuals=[residual.to(dtype) for residual in down],
                             mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]

    def controlnet_pipeline(self, controlnet: torch.nn.Module, denoiser: torch.nn.Module | None = None):
        from diffusers import StableDiffusionControlNetPipeline

        base = self.build_pipeline(denoiser)
        return StableDiffusionControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            controlnet=controlnet, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def lora_target_modules(self) -> list[str]:
        return list(UNET_ATTENTION_TARGETS)

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        from diffusers import StableDiffusionPipeline

        text_encoder_state = (text_encoder_states or {}).get("text_encoder")
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=lora_state, safe_serialization=True,
            unet_lora_adapter_metadata=metadata.get("lora_config"),
            text_encoder_lora_layers=text_encoder_state,
            text_encoder_lora_adapter_metadata=metadata.get("text_encoder_lora_config") if text_encoder_state else None,
        )
        return folder / "pytorch_lora_weights.safetensors"

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        pipeline = self.build_pipeline(denoiser)
        pipeline.scheduler = self._scheduler.__class__.from_config(self._scheduler.config)
        pipeline.save_pretrained(folder, safe_serialization=True)
        return folder


class StableDiffusion2x(StableDiffusion1x):
    family = "sd2x"
