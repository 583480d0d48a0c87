"""DeepFloyd IF: a cascade of pixel-space UNets conditioned on T5 embeddings.

There is no VAE: the model denoises RGB pixels directly, so the "latent" cache holds the resized
images themselves (as 8-bit values, exactly what the decoder produced, at a quarter of the float
size) and :meth:`DeepFloydIF.vae_scale_factor` is 1.

* Stage I (``IFPipeline``, the ``i-*`` flavours) generates 64 px images from text.
* Stage II (``IFSuperResolutionPipeline``, the ``ii-*`` flavours) generates a 4x larger image from
  text and a low-resolution image. Its UNet reads the noisy image concatenated with the low-res image
  upscaled to the output size and noised by a second schedule, and embeds that augmentation level as
  a class label. Training builds the same input from each training image (downscaled by 4 and
  upscaled again, as the pipeline does) at a random augmentation level, so the model learns to
  restore detail at every level the pipeline may be asked to use.

Both UNets predict noise *and* the range of the per-pixel variance (six output channels, diffusers'
``variance_type="learned_range"``); training regresses only the noise half, as :meth:`predict`
returns only the channels that match the target. The validation pipeline's sampler consumes both.

LoRA files use diffusers' layout (``unet.<module>.lora_A/lora_B``): ``IFPipeline`` and
``IFSuperResolutionPipeline`` load them with ``load_lora_weights`` (they inherit Stable Diffusion's
LoRA loader); :func:`load_lora` is that call, kept here as the documented entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ModelFamily
from simpletuner.models.components import component_source, load_t5
from simpletuner.objectives.targets import configure_training_scheduler, inference_scheduler_overrides

logger = logging.getLogger(__name__)

#: IF's T5 conditioning is 77 tokens long (the pipelines hard-code it, and the UNets were trained on it).
IF_MAX_TOKENS = 77
#: Stage II turns a 64 px image into a 256 px one.
STAGE_II_UPSCALE = 4
#: Attention projections, including the projections of the text tokens that IF's attention blocks
#: append to the image tokens (``add_k_proj`` / ``add_v_proj``): the text reaches the image only there.
UNET_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
#: The noise-augmentation schedule every IF stage II checkpoint ships (used when a folder lacks it).
IMAGE_NOISING_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                      beta_start=0.0001, beta_end=0.02)
IMAGE_CHANNELS = 3


def load_lora(pipeline, path: str | Path, adapter_name: str | None = None):
    """Load a LoRA trained here into an ``IFPipeline`` / ``IFSuperResolutionPipeline``.

    ``path`` is the output folder or the ``.safetensors`` file. diffusers' own loader does the work
    (IF's pipelines inherit it); this wrapper only accepts a file path as well as a folder.
    """
    path = Path(path)
    if path.is_file():
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    else:
        pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
    return pipeline


def pixels_to_bytes(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels decoded from 8-bit images -> their exact uint8 values (a lossless round trip)."""
    return ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def bytes_to_pixels(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pixels_to_bytes` (same arithmetic as the image decoder: ``v / 127.5 - 1``)."""
    if values.dtype != torch.uint8:
        return values.float()
    return values.float() / 127.5 - 1.0


def low_res(pixels: torch.Tensor, factor: int = STAGE_II_UPSCALE) -> torch.Tensor:
    """``pixels`` shrunk by ``factor``: the stand-in for what stage I would have generated
    (antialiased, so the small image holds the average colours rather than aliased samples)."""
    import torch.nn.functional as F

    height, width = pixels.shape[-2:]
    size = (max(1, height // factor), max(1, width // factor))
    return F.interpolate(pixels.float(), size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def upscale(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Enlarge a low-res input exactly as ``IFSuperResolutionPipeline`` does (bilinear, corners aligned)."""
    import torch.nn.functional as F

    return F.interpolate(image, size, mode="bilinear", align_corners=True)


class DeepFloydIF(ModelFamily):
    family = "deepfloyd"
    denoiser_name = "unet"

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import DDPMScheduler

        if self.is_single_file():
            raise RuntimeError(f"{self.model_path}: diffusers cannot load DeepFloyd IF from a single file; "
                               "point --pretrained_model_name_or_path at a diffusers folder or hub id")
        path = self.model_path
        self.tokenizer, self.text_encoder = self._load_t5()
        self.unet = self._load_unet()
        self._scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=self.config.revision)
        self._checkpoint_prediction_type = self._scheduler.config.get("prediction_type")
        self._scheduler.register_to_config(prediction_type=self.prediction_type)
        self._scheduler = configure_training_scheduler(self._scheduler, self.config)
        self.image_noising_scheduler = self._load_image_noising_scheduler() if self.is_stage_ii else None
        if self.is_stage_ii and self.config.validation_prompt and not self.config.validation_disable:
            raise RuntimeError(
                "DeepFloyd stage II upscales a low-resolution image, and validation has no image to give it; "
                "remove --validation_prompt (the trained LoRA or pipeline still loads in IFSuperResolutionPipeline)"
            )
        self.place(self.text_encoder, self.weight_dtype)
        self.place(self.unet)  # loaded in the weight dtype already
        self.denoiser = self.unet
        self.freeze_encoders()

    def _load_t5(self):
        """T5 from the base model or ``--pretrained_t5_model_name_or_path`` (components.load_t5)."""
        from transformers import AutoTokenizer

        return load_t5(self, tokenizer_class=AutoTokenizer)

    def _load_unet(self):
        """The UNet from the base model, or ``--pretrained_unet_model_name_or_path`` (a pipeline folder
        or the UNet's own folder) / ``--pretrained_unet_subfolder``."""
        from diffusers import UNet2DConditionModel

        override = self.config.pretrained_unet_model_name_or_path
        path, subfolder = component_source(override, "unet") if override else (self.model_path, "unet")
        if self.config.pretrained_unet_subfolder:
            subfolder = self.config.pretrained_unet_subfolder
        extra = {} if override else self.base_source()
        return self.load_denoiser(UNet2DConditionModel, path, subfolder=subfolder, torch_dtype=self.weight_dtype,
                                  **extra)

    def _load_image_noising_scheduler(self):
        from diffusers import DDPMScheduler

        try:
            return DDPMScheduler.from_pretrained(self.model_path, subfolder="image_noising_scheduler",
                                                 revision=self.config.revision)
        except (OSError, ValueError):
            logger.info("%s has no image_noising_scheduler: using IF stage II's standard one", self.model_path)
            return DDPMScheduler(**IMAGE_NOISING_SCHEDULER_CONFIG)

    @property
    def is_stage_ii(self) -> bool:
        """A super-resolution UNet reads the noisy image and the upscaled low-res image together."""
        return self.unet.config.in_channels == 2 * IMAGE_CHANNELS

    def default_prediction_type(self) -> str:
        shipped = getattr(self, "_checkpoint_prediction_type", None)
        return shipped if shipped in self.info.prediction_types else super().default_prediction_type()

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def noise_scheduler(self):
        return self._scheduler

    def vae_scale_factor(self) -> int:
        """Pixel space: one "latent" cell per pixel."""
        return 1

    @property
    def max_length(self) -> int:
        return self.config.tokenizer_max_length or IF_MAX_TOKENS

    @property
    def t5_padding(self) -> str:
        """IF's pipelines keep what T5 outputs at padded positions; ``zero`` blanks them."""
        return self.config.t5_padding or "unmodified"

    def fingerprint_parts(self) -> dict[str, str]:
        """Everything that changes a cached tensor: the T5 source and how prompts are tokenized and
        padded (text cache), and the 8-bit pixel format (image cache)."""
        return {**super().fingerprint_parts(),  # includes a quantized T5's precision
                "text_encoder": str(self.config.pretrained_t5_model_name_or_path or self.model_path),
                "max_length": str(self.max_length), "t5_padding": self.t5_padding}

    def latent_fingerprint_parts(self) -> dict[str, str]:
        """The image cache holds 8-bit pixels, not VAE latents."""
        return {**super().latent_fingerprint_parts(), "images": "uint8-pixels"}

    # --- conditioning and pixels -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """T5's last hidden states, ``max_length`` tokens per prompt, as IF's pipelines compute them
        (the attention mask keeps T5 from reading the padding)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        if self.t5_padding == "zero":
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return {"prompt_embeds": hidden}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pixels themselves (8-bit), with a zero spread: nothing is sampled at load time."""
        return {"latent_mean": pixels_to_bytes(pixels),
                "latent_std": torch.zeros(pixels.shape[0], 1, 1, 1)}

    def latents_from_cache(self, cached: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        return bytes_to_pixels(cached["latent_mean"])

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        model_input, class_labels = noisy_latents, None
        if self.is_stage_ii:
            if batch is None or "latent_mean" not in batch:
                raise ValueError("DeepFloyd stage II needs the clean training images (batch['latent_mean']) to "
                                 "build its low-resolution input")
            condition, class_labels = self.stage_ii_condition(
                bytes_to_pixels(batch["latent_mean"]).to(noisy_latents.device))
            model_input = torch.cat([noisy_latents, condition.to(noisy_latents.dtype)], dim=1)
        output = self.denoiser(model_input, timesteps, encoder_hidden_states=text["prompt_embeds"],
                               class_labels=class_labels, return_dict=False)[0]
        return output[:, : noisy_latents.shape[1]]  # the noise half; the rest is the learned variance

    def stage_ii_condition(self, clean: torch.Tensor, noise_level: torch.Tensor | None = None,
                           noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(noised upscaled low-res image, its noise level) for stage II, built like the pipeline
        builds them; the level is drawn uniformly over the augmentation schedule unless given."""
        upscaled = upscale(low_res(clean), tuple(clean.shape[-2:]))
        steps = self.image_noising_scheduler.config.num_train_timesteps
        if noise_level is None:
            noise_level = torch.randint(0, steps, (clean.shape[0],), device=clean.device)
        if noise is None:
            noise = torch.randn_like(upscaled)
        return self.image_noising_scheduler.add_noise(upscaled, noise, noise_level), noise_level

    # --- validation and outputs ------------------------------------------------------------------------

    def pipeline_call_arguments(self) -> dict[str, Any]:
        # Caption cleaning needs bs4/ftfy and would make validation prompts differ from training captions.
        return {"clean_caption": False}

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        """IF's own pipeline around ``denoiser``, encoding prompts exactly as training does."""
        pipeline = self._pipeline(denoiser, self._inference_scheduler())
        pipeline.encode_prompt = self._pipeline_prompt_encoder
        return pipeline

    def _inference_scheduler(self):
        # IF samples with DDPM: only a DDPM-style step consumes the learned variance.
        return self._scheduler.__class__.from_config(self._scheduler.config, **inference_scheduler_overrides(self.config))

    def _pipeline(self, denoiser: torch.nn.Module | None, scheduler):
        from diffusers import IFPipeline, IFSuperResolutionPipeline

        components = dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                          unet=denoiser if denoiser is not None else self.denoiser, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        if self.is_stage_ii:
            return IFSuperResolutionPipeline(image_noising_scheduler=self.image_noising_scheduler, **components)
        return IFPipeline(**components)

    def _pipeline_prompt_encoder(self, prompt, do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                                 device=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                                 clean_caption: bool = False):
        """Stands in for the pipeline's ``encode_prompt`` so validation sees the embeds training sees
        (``--tokenizer_max_length``, ``--t5_padding``); with IF's defaults both give the same tensors."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompts(prompts)["prompt_embeds"]
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            count = len(prompts) or prompt_embeds.shape[0] // num_images_per_prompt
            if negative_prompt is None or isinstance(negative_prompt, str):
                negatives = [negative_prompt or ""] * count
            else:
                negatives = list(negative_prompt)
            negative_prompt_embeds = self.encode_prompts(negatives)["prompt_embeds"]
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def lora_target_modules(self) -> list[str]:
        return list(UNET_ATTENTION_TARGETS)

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """diffusers' layout; the stored adapter config leaves out the training dropout, because
        ``load_lora_weights`` rebuilds the adapter from it, and its freshly made dropout layers would
        stay in training mode and make every sample of a loaded pipeline random."""
        from diffusers import IFPipeline

        adapter = metadata.get("lora_config")
        IFPipeline.save_lora_weights(folder, unet_lora_layers=lora_state, safe_serialization=True,
                                     unet_lora_adapter_metadata={**adapter, "lora_dropout": 0.0} if adapter else None)
        return folder / "pytorch_lora_weights.safetensors"

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        pipeline = self._pipeline(denoiser, self._scheduler.__class__.from_config(self._scheduler.config))
        pipeline.save_pretrained(folder, safe_serialization=True)
        return folder
