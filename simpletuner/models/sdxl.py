"""Stable Diffusion XL: a UNet2DConditionModel conditioned on two CLIP text encoders and on image sizes.

Text: the penultimate hidden states of CLIP-L (``text_encoder``) and CLIP-G (``text_encoder_2``),
77 tokens each, concatenated along the channels (``prompt_embeds``), plus CLIP-G's projected pooled
output (``pooled_prompt_embeds``), exactly what ``StableDiffusionXLPipeline.encode_prompt`` builds.

Micro-conditioning (``addition_embed_type="text_time"``): the UNet adds the pooled embedding and
Fourier embeddings of six numbers per image to its timestep embedding: original size, crop top-left
and target size, each (height, width) / (top, left). The data batches carry them per image
(:mod:`simpletuner.data.image_info`), so the model learns what cropped or upscaled sources look like.
The SDXL refiner takes five numbers instead: original size, crop and an aesthetic score
(``--data_aesthetic_score``, one value for the whole dataset).

Caption dropout trains with what the pipeline uses as the negative prompt: zeros for both embeddings
when the checkpoint says ``force_zeros_for_empty_prompt`` (SDXL base, like its original training),
otherwise the encoded empty prompt.

Timesteps: ``--refiner_training`` trains one expert of a base + refiner pair on a slice of the
schedule (``--refiner_training_strength``, default 0.2: the refiner takes the least noisy 20%,
``--refiner_training_invert_schedule`` the base the rest), and the SDXL refiner checkpoint trains on
its own low-noise slice unless ``--sdxl_refiner_uses_full_range``.

Kolors (:mod:`simpletuner.models.kolors`) reuses this class with a ChatGLM3 text encoder.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ModelFamily
from simpletuner.models.sd1x import UNET_ATTENTION_TARGETS
from simpletuner.objectives.targets import configure_training_scheduler, inference_scheduler_overrides

logger = logging.getLogger(__name__)

#: The share of the schedule the SDXL refiner was trained on (its low-noise end), and the default
#: ``--refiner_training_strength``.
REFINER_STRENGTH = 0.2
#: ``--data_aesthetic_score`` when unset: a high score, what one asks a refiner for.
DEFAULT_AESTHETIC_SCORE = 7.0
#: Flavours whose checkpoint is the refiner (its single file needs the img2img pipeline's configs).
REFINER_FLAVOURS = ("refiner-1.0",)


def refiner_timestep_window(num_train_timesteps: int, refiner_training: bool, strength: float | None,
                            invert: bool, is_refiner_checkpoint: bool, full_range: bool) -> tuple[int, int] | None:
    """The ``[begin, end)`` slice of integer timesteps to train on, or None for all of them.

    An SDXL base + refiner pair splits the schedule at ``strength * T``: the refiner denoises the
    least noisy ``[0, strength T)``, the base the rest. ``--refiner_training`` trains the refiner's
    part, or with ``--refiner_training_invert_schedule`` the base's. The refiner checkpoint trains on
    its part by default too, unless ``--sdxl_refiner_uses_full_range`` (e.g. to make it a standalone
    text-to-image model).
    """
    share = REFINER_STRENGTH if strength is None else float(strength)
    if refiner_training:
        split = max(1, min(num_train_timesteps - 1, round(share * num_train_timesteps)))
        return (split, num_train_timesteps) if invert else (0, split)
    if is_refiner_checkpoint and not full_range:
        return 0, max(1, round(share * num_train_timesteps))
    return None


def component_source(override: str | None, component: str, base: str, revision: str | None,
                     subfolder: str | None = None) -> tuple[str, dict[str, Any]]:
    """(path, from_pretrained keywords) of one pipeline component: ``override`` when given (its
    ``component`` subfolder when it is a pipeline folder; a hub id is taken as a pipeline repository
    like the base model), else the base model's ``component`` subfolder. ``subfolder`` wins."""
    if override:
        if Path(override).is_dir():
            found = component if (Path(override) / component).is_dir() else None
            return override, {"subfolder": subfolder or found}
        return override, {"subfolder": subfolder or component}
    return base, {"subfolder": subfolder or component, "revision": revision}


def inference_lora_config(config: dict | None) -> dict | None:
    """The adapter config as saved for inference: dropout 0. diffusers' ``load_lora_weights`` builds
    the adapter layers in training mode, so a dropout rate in the file would randomise every image."""
    return None if config is None else {**config, "lora_dropout": 0.0}


@lru_cache(maxsize=1)
def refiner_validation_pipeline_class():
    """``StableDiffusionXLImg2ImgPipeline`` taking a width and height: without an input image it
    starts from a flat grey picture at full strength, so validation shows the refiner generating on
    its own (there is no base-model image to refine)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    class RefinerValidationPipeline(StableDiffusionXLImg2ImgPipeline):
        def __call__(self, *args, width: int | None = None, height: int | None = None, image=None, **kwargs):
            if image is None:
                from PIL import Image

                image = Image.new("RGB", (width or 1024, height or 1024), (127, 127, 127))
                kwargs.setdefault("strength", 1.0)
            return super().__call__(*args, image=image, **kwargs)

    return RefinerValidationPipeline


class StableDiffusionXL(ModelFamily):
    family = "sdxl"
    denoiser_name = "unet"

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import DDPMScheduler

        if self.is_single_file():
            self._load_single_file()
        else:
            path = self.model_path
            self.force_zeros = bool(self._pipeline_index(path).get("force_zeros_for_empty_prompt", False))
            self.load_text_encoders(path)
            self.unet = self._load_unet(path)
            self.vae = self._load_vae(path)
            self._scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=self.config.revision)
        self._checkpoint_prediction_type = self._scheduler.config.get("prediction_type")
        self._scheduler.register_to_config(prediction_type=self.prediction_type)
        self._scheduler = configure_training_scheduler(self._scheduler, self.config)
        self.place_in_weight_dtype(self.frozen_modules() + [self.unet], vae=self.vae)
        self.denoiser = self.unet
        self.is_refiner = self._takes_aesthetic_score()
        if self.config.unet_attention_slice:
            self.unet.set_attention_slice("auto")  # half the heads at a time: lower peak memory, same result
        self.freeze_encoders()
        if not self.is_refiner and self.config.data_aesthetic_score is not None:
            logger.warning("--data_aesthetic_score only conditions the SDXL refiner; this UNet has no aesthetic-score "
                           "input, so it is ignored")
        window = self.training_timestep_window()
        logger.info("%s: %s, micro-conditioning %s%s", self.family, "refiner" if self.is_refiner else "base",
                    "original/crop/aesthetic score" if self.is_refiner else "original/crop/target size",
                    f", training timesteps [{window[0]}, {window[1]})" if window else "")

    def _pipeline_index(self, path: str) -> dict:
        """The pipeline's ``model_index.json`` (which components it has, ``force_zeros_for_empty_prompt``)."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path, revision=self.config.revision)

    def load_text_encoders(self, path: str) -> None:
        """CLIP-L and CLIP-G with their tokenizers; the refiner ships only CLIP-G."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        source = dict(revision=self.config.revision)
        weights = dict(variant=self.config.variant, **source)
        has_first = (self._pipeline_index(path).get("text_encoder") or [None])[0] is not None
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **source) if has_first else None
        self.text_encoder = self.load_text_encoder("text_encoder", CLIPTextModel, path, subfolder="text_encoder",
                                                   **weights) if has_first else None
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **source)
        self.text_encoder_2 = self.load_text_encoder("text_encoder_2", CLIPTextModelWithProjection, path,
                                                     subfolder="text_encoder_2", **weights)

    def _load_unet(self, path: str):
        """The UNet, from ``--pretrained_unet_model_name_or_path`` / ``_subfolder`` when given."""
        from diffusers import UNet2DConditionModel

        config = self.config
        override = config.pretrained_unet_model_name_or_path
        unet_path, extra = component_source(override, "unet", path, config.revision,
                                            config.pretrained_unet_subfolder)
        if config.variant and not override:
            extra["variant"] = config.variant
        return self.load_denoiser(UNet2DConditionModel, unet_path, **extra)

    def _load_vae(self, path: str):
        from diffusers import AutoencoderKL

        override = self.config.pretrained_vae_model_name_or_path
        vae_path, extra = component_source(override, "vae", path, self.config.revision)
        if self.config.variant and not override:
            extra["variant"] = self.config.variant
        return self.load_component("vae", AutoencoderKL, vae_path, **extra)

    def single_file_pipeline_class(self):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        flavour = self.config.model_flavour or self.info.default_flavour
        return StableDiffusionXLImg2ImgPipeline if flavour in REFINER_FLAVOURS else StableDiffusionXLPipeline

    def _load_single_file(self) -> None:
        from diffusers import DDPMScheduler

        pipeline = self.load_single_file_pipeline(self.single_file_pipeline_class())
        for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
            setattr(self, name, getattr(pipeline, name, None))
        self.force_zeros = bool(pipeline.config.get("force_zeros_for_empty_prompt", False))
        self.unet = pipeline.unet if not self.config.pretrained_unet_model_name_or_path \
            else self._load_unet(self.model_path)
        self.vae = self._load_vae(self.model_path) if self.config.pretrained_vae_model_name_or_path else pipeline.vae
        self._scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    def _takes_aesthetic_score(self) -> bool:
        """The refiner's UNet embeds five micro-conditioning numbers (the last an aesthetic score)
        where the base embeds six; told apart by the width of its added-embedding input."""
        numbers = (self.unet.config.projection_class_embeddings_input_dim - self.pooled_width()) \
            // self.unet.config.addition_time_embed_dim
        return numbers == 5

    def pooled_width(self) -> int:
        return self.text_encoder_2.config.projection_dim

    def default_prediction_type(self) -> str:
        shipped = getattr(self, "_checkpoint_prediction_type", None)
        return shipped if shipped in self.info.prediction_types else super().default_prediction_type()

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.vae) if m is not None]

    def noise_scheduler(self):
        return self._scheduler

    def training_timestep_window(self) -> tuple[int, int] | None:
        config = self.config
        return refiner_timestep_window(
            self._scheduler.config.num_train_timesteps, bool(config.refiner_training),
            config.refiner_training_strength,
            bool(config.refiner_training_invert_schedule), self.is_refiner,
            bool(config.sdxl_refiner_uses_full_range),
        )

    def aesthetic_score(self) -> float:
        score = self.config.data_aesthetic_score
        return DEFAULT_AESTHETIC_SCORE if score is None else float(score)

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.text_conditioning(prompts)

    def text_conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            if encoder is None:
                continue
            tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                               return_tensors="pt")
            output = encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # the penultimate layer, as SDXL was trained
            if output[0].ndim == 2:  # CLIP-G's projected pooled output
                pooled = output[0]
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def trainable_text_encoders(self) -> dict[str, torch.nn.Module]:
        return {name: encoder for name, encoder in (("text_encoder", self.text_encoder),
                                                    ("text_encoder_2", self.text_encoder_2)) if encoder is not None}

    def unconditional_text(self, empty_prompt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zeros when the pipeline zeroes its empty negative prompt, the encoded ``""`` otherwise."""
        if self.force_zeros:
            return {key: torch.zeros_like(value) for key, value in empty_prompt.items()}
        return empty_prompt

    def add_time_ids(self, latents: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """The micro-conditioning numbers per sample, (B, 6) or the refiner's (B, 5).

        Without size information in ``batch`` the image is taken as uncropped and trained at its
        own size (what the pipeline assumes by default)."""
        count = latents.shape[0]
        if batch is not None and "original_size" in batch:
            original, crop, target = (batch[key].to(latents.device) for key in
                                      ("original_size", "crop_top_left", "target_size"))
        else:
            scale = self.vae_scale_factor()
            target = torch.tensor([[latents.shape[-2] * scale, latents.shape[-1] * scale]],
                                  device=latents.device).expand(count, 2)
            original, crop = target, torch.zeros_like(target)
        last = torch.full((count, 1), self.aesthetic_score(), device=latents.device) if self.is_refiner else target
        return torch.cat([original.float(), crop.float(), last.float()], dim=1).to(latents.dtype)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": self.add_time_ids(noisy_latents, batch)}
        return self.denoiser(noisy_latents, timesteps, encoder_hidden_states=text["prompt_embeds"],
                             added_cond_kwargs=added, return_dict=False)[0]

    # --- validation and outputs ------------------------------------------------------------------------

    def inference_scheduler(self, overrides: dict | None = None):
        """Euler, as SDXL (and Kolors) ship it, with the training schedule's betas and prediction type."""
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(self._scheduler.config, **(overrides or {}))

    def _pipeline(self, denoiser: torch.nn.Module | None, scheduler, validation: bool = False):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        unet = denoiser if denoiser is not None else self.denoiser
        parts = dict(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                     tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=unet, scheduler=scheduler,
                     force_zeros_for_empty_prompt=self.force_zeros,
                     # diffusers adds its own watermarker whenever invisible-watermark is installed (and
                     # fails on images under 256x256 pixels); --enable_watermark decides (validation/watermark.py)
                     add_watermarker=False)
        if self.is_refiner:
            cls = refiner_validation_pipeline_class() if validation else StableDiffusionXLImg2ImgPipeline
            return cls(requires_aesthetics_score=True, **parts)
        return StableDiffusionXLPipeline(**parts)

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        return self._pipeline(denoiser, self.inference_scheduler(inference_scheduler_overrides(self.config)),
                              validation=True)

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """The refiner samples with the aesthetic score it was trained with."""
        return {"aesthetic_score": self.aesthetic_score()} if self.is_refiner else {}

    # --- ControlNet (--controlnet; models/controlnet.py) ----------------------------------------------

    def controlnet_from_denoiser(self, overrides: dict[str, Any] | None) -> torch.nn.Module:
        """diffusers' ``ControlNetModel.from_unet`` layout (with SDXL's text-time embedding), its
        conditioning embedding halving the control image as often as the VAE does, ``overrides`` on
        top, weights from the UNet."""
        from diffusers import ControlNetModel

        from simpletuner.models.controlnet import new_controlnet, unet_controlnet_layout

        if self.is_refiner:
            raise ValueError("--controlnet: diffusers has no ControlNet pipeline for the SDXL refiner; train the "
                             "ControlNet on the base model")
        layout = unet_controlnet_layout(self.unet, self.vae_scale_factor())
        return new_controlnet(ControlNetModel, layout, self.unet, overrides)

    def controlnet_predict(self, controlnet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           text: dict[str, torch.Tensor], control_pixels: torch.Tensor,
                           batch: dict | None = None) -> torch.Tensor:
        """As StableDiffusionXLControlNetPipeline: the control image in [0, 1], the same micro-conditioning
        for the ControlNet and the UNet."""
        dtype = controlnet.dtype
        added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": self.add_time_ids(noisy_latents, batch)}
        control = ((control_pixels + 1) / 2).to(noisy_latents.device, dtype)
        down, mid = controlnet(noisy_latents.to(dtype), timesteps,
                               encoder_hidden_states=text["prompt_embeds"].to(dtype), controlnet_cond=control,
                               added_cond_kwargs={key: value.to(dtype) for key, value in added.items()},
                               return_dict=False)
        return self.denoiser(noisy_latents, timesteps, encoder_hidden_states=text["prompt_embeds"],
                             added_cond_kwargs=added,
                             down_block_additional_residuals=[residual.to(noisy_latents.dtype) for residual in down],
                             mid_block_additional_residual=mid.to(noisy_latents.dtype), return_dict=False)[0]

    def controlnet_pipeline(self, controlnet: torch.nn.Module, denoiser: torch.nn.Module | None = None):
        from diffusers import StableDiffusionXLControlNetPipeline

        base = self.build_pipeline(denoiser)
        return StableDiffusionXLControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
            tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=controlnet, scheduler=base.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros, add_watermarker=False,
        )

    def lora_target_modules(self) -> list[str]:
        return list(UNET_ATTENTION_TARGETS)

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """``StableDiffusionXLPipeline.save_lora_weights``: ``unet.*``, ``text_encoder.*`` and
        ``text_encoder_2.*`` keys in one file that ``load_lora_weights`` reads back."""
        from diffusers import StableDiffusionXLPipeline

        states = text_encoder_states or {}
        encoder_config = inference_lora_config(metadata.get("text_encoder_lora_config"))
        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=lora_state, safe_serialization=True,
            unet_lora_adapter_metadata=inference_lora_config(metadata.get("lora_config")),
            text_encoder_lora_layers=states.get("text_encoder"),
            text_encoder_lora_adapter_metadata=encoder_config if states.get("text_encoder") else None,
            text_encoder_2_lora_layers=states.get("text_encoder_2"),
            text_encoder_2_lora_adapter_metadata=encoder_config if states.get("text_encoder_2") else None,
        )
        return folder / "pytorch_lora_weights.safetensors"

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        self._pipeline(denoiser, self.inference_scheduler()).save_pretrained(folder, safe_serialization=True)
        return folder
