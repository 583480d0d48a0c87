"""Wan 2.1 and 2.2: flow-matching video transformers over 3-D patches of a causal video VAE.

* **Shapes.** One family, four checkpoint shapes, told apart by what the checkpoint holds (its
  ``model_index.json`` and the transformer's config), so a local folder needs no flavour:

  - *text-to-video* (2.1 1.3B / 14B): one ``WanTransformer3DModel`` on 16-channel latents;
  - *image-to-video by channels* (2.1 I2V 14B, 2.2 I2V A14B): the transformer reads 36 channels, the
    noisy latents followed by a 4-channel first-frame mask and the VAE latents of the first frame
    followed by black frames; 2.1 also attends to CLIP image features of the first frame
    (``image_dim``). Both conditionings are computed from the clip when its latents are cached
    (``condition_latents``, ``image_embeds``) and come back in every batch;
  - *TI2V* (2.2 5B, ``expand_timesteps``): its own VAE (48 channels, 16x spatial compression) and a
    timestep per token. ``--model_flavour ti2v-5b-2.2`` trains image-to-video: the first latent frame
    of every clip stays clean, gets timestep 0 and is left out of the loss (spec 004, through
    :mod:`simpletuner.objectives.first_frame`); ``t2v-5b-2.2`` trains text-to-video on the same weights;
  - *two experts* (2.2 A14B): ``transformer`` denoises the noisy part of the schedule (timesteps at or
    above ``boundary_ratio * 1000``), ``transformer_2`` the rest. ``--refiner_training`` trains one
    expert, the low-noise one, or with ``--refiner_training_invert_schedule`` the high-noise one, on
    its own range of noise levels (``--refiner_training_strength`` moves the boundary, default the
    checkpoint's); the other expert is not even loaded. Without it both train in one run as a
    :class:`WanExperts` pair that hands each sample to the expert of its noise level.

* **Text.** UMT5's last hidden states, ``--tokenizer_max_length`` tokens (default 512, the pipeline's),
  the padded positions set to zero as ``WanPipeline`` does. Caption dropout trains with the empty
  prompt, the pipeline's negative prompt.
* **Latents.** The VAE posterior normalised per channel, ``(z - latents_mean) / latents_std``. Clips
  must have ``1 + 4k`` frames (the VAE encodes the first frame alone, then groups of four); images
  train as one-frame clips.
* **Objective.** Flow matching, the transformer fed ``sigma * 1000``. The default shift is the one the
  flavour's own sampler uses (:data:`FLAVOUR_SHIFTS`); a local folder without a flavour takes its
  scheduler's ``flow_shift``.
* **LoRA.** :data:`LORA_TARGETS` (attention and feed-forward of every block, plus the image
  key/value projections of 2.1 I2V). The file is ``WanPipeline.save_lora_weights``' layout and loads
  with ``load_lora_weights``; a low-noise expert's file loads with ``load_lora_weights(...,
  load_into_transformer_2=True)``, and a two-expert run's file holds ``transformer.`` and
  ``transformer_2.`` keys (``pipe.transformer_2.load_lora_adapter(file, prefix="transformer_2")``).
  ``--lora_format comfyui`` writes ComfyUI's native names (``diffusion_model.blocks.N.self_attn.q``).
* **Validation.** ``WanPipeline`` / ``WanImageToVideoPipeline`` whose prompts are encoded by this
  family (the same tokens as training, memoised); a one-expert run samples with its expert alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from simpletuner.models.base import CleanFirstFrame, ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import (LORA_WEIGHT_NAME, component_source, load_vae, refuse_text_encoder_lora,
                                           save_transformer_lora)

logger = logging.getLogger(__name__)

#: T5 tokens when ``--tokenizer_max_length`` is unset: ``WanPipeline.__call__``'s default.
DEFAULT_TEXT_TOKENS = 512
#: ``--validation_guidance`` when unset: the pipelines' default.
DEFAULT_VALIDATION_GUIDANCE = 5.0
#: The flow shift each flavour's sampler uses (diffusers' model cards and Wan's own configs: 3.0 for
#: 480p, 5.0 for 720p and the 5B model, 12.0 for the 2.2 text-to-video experts).
FLAVOUR_SHIFTS = {
    "t2v-1.3b-2.1": 3.0, "t2v-14b-2.1": 5.0, "i2v-480p-14b-2.1": 3.0, "i2v-720p-14b-2.1": 5.0,
    "ti2v-5b-2.2": 5.0, "t2v-5b-2.2": 5.0, "t2v-a14b-2.2": 12.0, "i2v-a14b-2.2": 5.0,
}
#: The shift of a local model whose scheduler names none: what Wan's trainers use (spec 004).
FALLBACK_SHIFT = 5.0
#: Flavours of the 2.2 5B checkpoint that train text-to-video instead of keeping the first frame clean.
TEXT_TO_VIDEO_5B_FLAVOURS = ("t2v-5b-2.2",)

# --- LoRA targets ------------------------------------------------------------------------------------
# Suffixes of module names in diffusers' WanTransformer3DModel; every block ``blocks.N`` has a
# self-attention ``attn1``, a cross-attention ``attn2`` (with ``add_k_proj``/``add_v_proj`` reading the
# CLIP image tokens in 2.1 I2V) and a feed-forward ``ffn``.

SELF_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
CROSS_ATTENTION = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
IMAGE_ATTENTION = ("attn2.add_k_proj", "attn2.add_v_proj")
FEED_FORWARD = ("ffn.net.0.proj", "ffn.net.2")
#: The default: every linear layer of every block (what Wan's own LoRA trainers adapt).
LORA_TARGETS = (*SELF_ATTENTION, *CROSS_ATTENTION, *FEED_FORWARD)



@dataclass(frozen=True)
class WanShape:
    """What a loaded Wan checkpoint is.

    Attributes:
        channel_conditioning: 2.1 I2V / 2.2 I2V A14B: a first-frame mask and first-frame latents are
            concatenated to the noisy latents.
        image_embeds: the transformer also reads CLIP image features (2.1 I2V).
        clean_first_frame: 2.2 TI2V trained as image-to-video (first latent frame kept clean).
        expand_timesteps: the checkpoint's pipeline feeds a timestep per token (2.2 5B).
        boundary_ratio: where a two-expert checkpoint hands over from ``transformer`` to
            ``transformer_2`` (share of the schedule below it); None for a single transformer.
    """

    channel_conditioning: bool = False
    image_embeds: bool = False
    clean_first_frame: bool = False
    expand_timesteps: bool = False
    boundary_ratio: float | None = None

    @property
    def image_to_video(self) -> bool:
        return self.channel_conditioning or self.clean_first_frame

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None


class WanExperts(torch.nn.Module):
    """Both experts of a two-expert checkpoint as one trained denoiser: every sample goes to the expert
    of its noise level, ``transformer`` at or above ``boundary_timestep``, ``transformer_2`` below it
    (the pipelines' rule). Its module tree names them as the pipeline does, so a LoRA over it is a
    ``transformer.*`` and a ``transformer_2.*`` adapter."""

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_timestep: float):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def experts(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """Which samples the high-noise expert takes (per-frame timesteps: by the noisiest frame)."""
        level = timestep if timestep.dim() == 1 else timestep.amax(dim=1)
        return level >= self.boundary_timestep

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = False,
                attention_kwargs: dict | None = None):
        high = self.high_noise(timestep)
        outputs, order = [], []
        for expert, chosen in ((self.transformer, high), (self.transformer_2, ~high)):
            rows = chosen.nonzero().flatten()
            if rows.numel() == 0:
                continue
            image = encoder_hidden_states_image[rows] if encoder_hidden_states_image is not None else None
            outputs.append(expert(hidden_states=hidden_states[rows], timestep=timestep[rows],
                                  encoder_hidden_states=encoder_hidden_states[rows], encoder_hidden_states_image=image,
                                  attention_kwargs=attention_kwargs, return_dict=False)[0])
            order.append(rows)
        output = torch.cat(outputs)[torch.argsort(torch.cat(order))]
        return (output,)


def refuse_two_experts_on_several_processes() -> None:
    """The config rule (options/wan_rules.py) refuses both experts with ``--num_processes`` above 1; a
    process count that comes from config.env only shows here. Each sample goes to one expert, so a
    process can finish a step with no gradient for the other, and the replicas would drift apart."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(f"this run trains both Wan 2.2 experts on {dist.get_world_size()} processes, which DDP "
                           "cannot keep in step (a step can leave one expert without gradients on some process); "
                           "train one expert per run (`--refiner_training`, with `--refiner_training_invert_schedule` "
                           "for the high-noise one) or use one process (TRAINING_NUM_PROCESSES=1 in config.env)")


class Wan(ModelFamily):
    family = "wan"
    denoiser_name = "transformer"
    encodes_video = True
    flow_patch_size = 2
    default_flow_shift = FALLBACK_SHIFT

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_tokens = int(config.tokenizer_max_length or DEFAULT_TEXT_TOKENS)
        self.shape = WanShape()
        self.experts: dict[str, torch.nn.Module] = {}  # pipeline component name -> loaded transformer
        self.trained_expert: str | None = None  # "transformer" / "transformer_2" when one expert trains
        self.image_encoder = self.image_processor = None
        self.pair: WanExperts | None = None  # both experts of a two-expert run
        self._pipeline_name = WanPipeline.__name__
        self._validation_prompts: dict[str, torch.Tensor] = {}

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        import diffusers
        from transformers import AutoTokenizer, UMT5EncoderModel

        if self.is_single_file():
            raise RuntimeError(f"{self.model_path}: wan loads diffusers pipeline folders (or hub ids); a single "
                               "checkpoint file is not supported, convert it to a diffusers folder first")
        index = diffusers.DiffusionPipeline.load_config(self.model_path, revision=self.config.revision)
        self._pipeline_name = index.get("_class_name", WanPipeline.__name__)
        self.experts = self._load_transformers(index)  # first: a wrong expert choice fails before UMT5 loads
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, subfolder="tokenizer",
                                                       **self.base_source(weights=False))
        self.text_encoder = self.load_text_encoder("text_encoder", UMT5EncoderModel, self.model_path,
                                                   subfolder="text_encoder", dtype=self.weight_dtype,
                                                   **self.base_source())
        self.vae = self._load_vae()
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        self._scheduler = scheduler_class.from_pretrained(self.model_path, subfolder="scheduler",
                                                          **self.base_source(weights=False))
        if self.shape.image_embeds:
            from transformers import CLIPImageProcessor, CLIPVisionModel

            self.image_processor = CLIPImageProcessor.from_pretrained(self.model_path, subfolder="image_processor",
                                                                      **self.base_source(weights=False))
            self.image_encoder = self.load_component("image_encoder", CLIPVisionModel, self.model_path,
                                                     subfolder="image_encoder", dtype=self.weight_dtype,
                                                     **self.base_source())
        for module in (self.text_encoder, self.vae, self.image_encoder, *self.experts.values()):
            if module is not None:
                module.to(self.device)
        self.denoiser = self._trained_denoiser()
        self.freeze_encoders()
        self.default_flow_shift = self._flow_shift()
        window = self.training_sigma_window()
        logger.info("wan: %s%s, %d text tokens, default flow shift %g%s", self._describe_shape(),
                    f", training the {self.trained_expert} expert only" if self.trained_expert else "",
                    self.text_tokens, self.default_flow_shift,
                    f", sigmas in [{window[0]:g}, {window[1]:g})" if window else "")

    def _describe_shape(self) -> str:
        shape = self.shape
        kind = ("image-to-video (clean first frame)" if shape.clean_first_frame else
                "image-to-video (first-frame channels" + (" and CLIP image features)" if shape.image_embeds else ")")
                if shape.channel_conditioning else "text-to-video")
        return kind + (f", two experts split at {shape.boundary_ratio:g}" if shape.two_experts else "")

    def _load_transformers(self, index: dict) -> dict[str, torch.nn.Module]:
        """The transformer(s) this run needs, and :attr:`shape` from the checkpoint."""
        has_second = bool(index.get("transformer_2") and index["transformer_2"][0])
        boundary = index.get("boundary_ratio") if has_second else None
        flavour = self.config.model_flavour
        if self.config.refiner_training and boundary is None:
            raise RuntimeError(f"`--refiner_training` trains one expert of a two-expert Wan 2.2 model, but "
                               f"{self.model_path} has a single transformer; remove it")
        names = ["transformer", "transformer_2"] if boundary is not None else ["transformer"]
        if self.config.refiner_training:
            self.trained_expert = "transformer" if self.config.refiner_training_invert_schedule else "transformer_2"
            names = [self.trained_expert]
        override = self.config.pretrained_transformer_model_name_or_path
        if override and len(names) > 1:
            raise RuntimeError("`--pretrained_transformer_model_name_or_path` replaces the trained transformer, but this "
                               "run trains both Wan 2.2 experts; pick one with `--refiner_training` (and "
                               "`--refiner_training_invert_schedule` for the high-noise one)")
        experts = {name: self._load_transformer(name, override) for name in names}
        first = next(iter(experts.values()))
        z_dim = self._vae_channels()
        expand = bool(index.get("expand_timesteps", False))
        self.shape = WanShape(
            channel_conditioning=first.config.in_channels > z_dim,
            image_embeds=first.config.image_dim is not None,
            clean_first_frame=expand and flavour not in TEXT_TO_VIDEO_5B_FLAVOURS,
            expand_timesteps=expand, boundary_ratio=float(boundary) if boundary is not None else None)
        if expand and flavour is None:
            logger.info("wan: a 2.2 TI2V checkpoint without --model_flavour trains image-to-video (clean first "
                        "frame); --model_flavour t2v-5b-2.2 trains text-to-video")
        return experts

    def _load_transformer(self, name: str, override: str | None):
        """One expert (pipeline component ``name``); every expert this run loads is part of its denoiser."""
        from diffusers import WanTransformer3DModel

        dtype = {"torch_dtype": self.weight_dtype}
        if override:
            subfolder = self.config.pretrained_transformer_subfolder
            path, folder = (override, subfolder) if subfolder else component_source(override, name)
            return self.load_denoiser(WanTransformer3DModel, path, subfolder=folder, **dtype)
        return self.load_denoiser(WanTransformer3DModel, self.model_path, subfolder=name, **dtype, **self.base_source())

    def _vae_channels(self) -> int:
        """The VAE's latent channels, from its config file (the VAE itself loads later)."""
        from diffusers import AutoencoderKLWan

        path, folder = self._vae_location()
        return int(AutoencoderKLWan.load_config(path, subfolder=folder, revision=self.config.revision)["z_dim"])

    def _vae_location(self) -> tuple[str, str | None]:
        override = self.config.pretrained_vae_model_name_or_path
        return component_source(override, "vae") if override else (self.model_path, "vae")

    def _load_vae(self):
        from diffusers import AutoencoderKLWan

        return load_vae(self, AutoencoderKLWan)

    def _trained_denoiser(self) -> torch.nn.Module:
        if len(self.experts) == 2:
            refuse_two_experts_on_several_processes()
            self.pair = WanExperts(self.experts["transformer"], self.experts["transformer_2"],
                                   self.shape.boundary_ratio * self.num_train_timesteps())
            return self.pair
        self.pair = None
        self.transformer = next(iter(self.experts.values()))
        return self.transformer

    def num_train_timesteps(self) -> int:
        return int(self._scheduler.config.num_train_timesteps)

    def _flow_shift(self) -> float:
        """The flavour's sampler shift; for a local model without a flavour, its scheduler's."""
        flavour = self.config.model_flavour
        if flavour is None and not self.config.pretrained_model_name_or_path:
            flavour = self.info.default_flavour
        if flavour in FLAVOUR_SHIFTS:
            return FLAVOUR_SHIFTS[flavour]
        scheduler = self._scheduler.config
        return float(scheduler.get("flow_shift") or scheduler.get("shift") or FALLBACK_SHIFT)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [module for module in (self.text_encoder, self.vae, self.image_encoder) if module is not None]

    def noise_scheduler(self):
        return self._scheduler

    def fingerprint_parts(self) -> dict[str, str]:
        return {**super().fingerprint_parts(), "text_tokens": str(self.text_tokens)}

    def latent_fingerprint_parts(self) -> dict[str, str]:
        """Image-to-video checkpoints cache the first-frame conditioning with the latents."""
        parts = super().latent_fingerprint_parts()
        if self.shape.channel_conditioning:
            parts["first_frame_conditioning"] = "clip-image-features+latents" if self.shape.image_embeds else "latents"
        return parts

    # --- video ----------------------------------------------------------------------------------------

    def vae_scale_factor(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def temporal_compression(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    def training_sigma_window(self) -> tuple[float, float] | None:
        """One expert's noise levels: the high-noise expert sigmas at or above the boundary, the
        low-noise one below it (``--refiner_training_strength``, default the checkpoint's boundary)."""
        if self.trained_expert is None:
            return None
        strength = self.config.refiner_training_strength
        boundary = float(strength) if strength is not None else self.shape.boundary_ratio
        return (boundary, 1.0) if self.trained_expert == "transformer" else (0.0, boundary)

    def first_frame_conditioning(self, batch: dict, latents: torch.Tensor,
                                 generator: torch.Generator | None = None) -> CleanFirstFrame | None:
        """2.2 TI2V as image-to-video: every clip of more than one latent frame continues its first frame
        (a one-frame clip, an image, has nothing left to learn once that frame is clean: it trains as
        text-to-image)."""
        if not self.shape.clean_first_frame or latents.dim() != 5 or latents.shape[2] < 2:
            return None
        return CleanFirstFrame(torch.ones(latents.shape[0], dtype=torch.bool, device=latents.device))

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """UMT5's last hidden states with the padded positions zeroed, as ``WanPipeline`` encodes them."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.text_tokens,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        return {"prompt_embeds": embeds * mask.unsqueeze(-1).to(embeds.dtype)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The VAE posterior of clips (B, C, F, H, W) or images (N, C, H, W, encoded as one-frame clips);
        image-to-video checkpoints add the first frame's conditioning latents (and CLIP features)."""
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        outputs = {"latent_mean": posterior.mean.float(), "latent_std": posterior.std.float()}
        if self.shape.channel_conditioning:
            outputs["condition_latents"] = self._condition_latents(pixels)
        if self.shape.image_embeds:
            outputs["image_embeds"] = self._image_features(pixels[:, :, 0])
        return outputs

    def _condition_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """What ``WanImageToVideoPipeline`` conditions on: the VAE latents (posterior mode) of the first
        frame followed by black frames, as long as the clip."""
        frames = torch.zeros_like(pixels)
        frames[:, :, 0] = pixels[:, :, 0]
        return self.vae.encode(frames).latent_dist.mode().float()

    def _image_features(self, first_frames: torch.Tensor) -> torch.Tensor:
        """CLIP's penultimate hidden states of the first frames, through the checkpoint's processor."""
        from PIL import Image

        array = ((first_frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images = [Image.fromarray(frame.permute(1, 2, 0).cpu().numpy()) for frame in array]
        inputs = self.image_processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.image_encoder.dtype)
        return self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2].float()

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(z - latents_mean) / latents_std`` per channel, the scale the transformer works in."""
        config = self.vae.config
        shape = (1, -1, *([1] * (latents.dim() - 2)))
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return (latents - mean) / std

    def latents_from_cache(self, cached: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = cached["latent_mean"], cached["latent_std"]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return self.normalize_latents(mean + std * noise)

    def condition_channels(self, batch: dict, like: torch.Tensor) -> torch.Tensor:
        """The channels a channel-conditioned checkpoint reads after the noisy latents: a mask that is 1
        on the first latent frame (one channel per pixel frame it holds) and the first frame's latents."""
        condition = self.normalize_latents(batch["condition_latents"].to(like.device, dtype=torch.float32))
        count, _, frames, height, width = like.shape
        mask = torch.zeros(count, self.temporal_compression(), frames, height, width, device=like.device)
        mask[:, :, 0] = 1
        return torch.cat([mask, condition], dim=1).to(like.dtype)

    def model_timesteps(self, timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One timestep per sample as is; one per latent frame spread over that frame's tokens."""
        if timesteps.dim() == 1:
            return timesteps
        from simpletuner.objectives.first_frame import token_timesteps

        return token_timesteps(timesteps, latents.shape, self.transformer_patch_size())

    def transformer_patch_size(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.experts.values())).config.patch_size)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        hidden = noisy_latents
        if self.shape.channel_conditioning:
            hidden = torch.cat([noisy_latents, self.condition_channels(batch, noisy_latents)], dim=1)
        image = batch["image_embeds"].to(noisy_latents.device, noisy_latents.dtype) if self.shape.image_embeds else None
        return self.denoiser(hidden_states=hidden, timestep=self.model_timesteps(timesteps, noisy_latents),
                             encoder_hidden_states=text["prompt_embeds"], encoder_hidden_states_image=image,
                             return_dict=False)[0]

    # --- blocks ----------------------------------------------------------------------------------------

    def transformer_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """Every loaded expert's blocks, the high-noise expert's first (``transformer_2.blocks.N`` for
        the second expert of a two-expert run)."""
        prefix = len(self.experts) > 1
        return [(f"{name}.blocks.{index}" if prefix else f"blocks.{index}", block)
                for name, expert in self.experts.items() for index, block in enumerate(expert.blocks)]

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th block of each trained expert (default: all)."""
        return sum(checkpoint_every_nth_block(expert, list(expert.blocks), interval) for expert in self.experts.values())

    def lora_target_modules(self) -> list[str]:
        return [*LORA_TARGETS, *(IMAGE_ATTENTION if self.shape.image_embeds else ())]

    def lora_components(self) -> dict[str, torch.nn.Module]:
        """A two-expert run's adapter spans both experts, named as their pipeline components."""
        if self.pair is not None:
            return self.pair.experts()
        return super().lora_components()

    # --- validation and outputs --------------------------------------------------------------------------

    def _saved_pipeline_class(self):
        """The pipeline class the base model's ``model_index.json`` names (2.2 5B: ``WanPipeline``)."""
        return WanImageToVideoPipeline if self._pipeline_name == WanImageToVideoPipeline.__name__ else WanPipeline

    def _validation_pipeline_class(self):
        """Image-to-video checkpoints (channels or clean first frame) sample from an input image."""
        return WanImageToVideoValidationPipeline if self.shape.image_to_video else WanValidationPipeline

    def _components(self, denoiser: torch.nn.Module | None = None, full: bool = False,
                    image_to_video: bool = False) -> dict[str, Any]:
        """Pipeline components around ``denoiser``. A one-expert run samples with its expert alone;
        ``full`` (a saved pipeline) loads the other expert from the base model so the folder is whole.
        ``image_to_video``: for ``WanImageToVideoPipeline``, which also takes the CLIP image encoder."""
        denoiser = denoiser if denoiser is not None else self.denoiser
        if isinstance(denoiser, WanExperts):
            transformers = denoiser.experts()
        elif self.trained_expert is not None and full:
            other = "transformer_2" if self.trained_expert == "transformer" else "transformer"
            transformers = {self.trained_expert: denoiser, other: self._load_transformer(other, None)}
        else:
            transformers = {"transformer": denoiser}
        two = len(transformers) == 2
        components = dict(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
            scheduler=self._scheduler.__class__.from_config(self._scheduler.config),
            transformer=transformers["transformer"], transformer_2=transformers.get("transformer_2"),
            boundary_ratio=self.shape.boundary_ratio if two else None,
            expand_timesteps=self.shape.expand_timesteps,
        )
        if image_to_video:
            components.update(image_encoder=self.image_encoder, image_processor=self.image_processor)
        return components

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        pipeline_class = self._validation_pipeline_class()
        pipeline = pipeline_class(**self._components(denoiser, image_to_video=self.shape.image_to_video))
        pipeline.family = self
        return pipeline

    def validation_defaults(self) -> dict[str, Any]:
        return {"validation_guidance": DEFAULT_VALIDATION_GUIDANCE}

    def validation_text(self, prompts: list[str]) -> torch.Tensor:
        """:meth:`encode_prompts` for validation, each distinct prompt encoded once per run."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._validation_prompts]
        if missing:
            encoded = self.encode_prompts(missing)["prompt_embeds"]
            for index, prompt in enumerate(missing):
                self._validation_prompts[prompt] = encoded[index:index + 1]
        return torch.cat([self._validation_prompts[p] for p in prompts])

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """``WanPipeline.save_lora_weights``' layout. A two-expert run's state already names each expert
        (``transformer.`` / ``transformer_2.``), and is written with those prefixes."""
        if self.pair is None:
            return save_transformer_lora(self, WanPipeline, folder, lora_state, metadata, text_encoder_states)
        refuse_text_encoder_lora(self, text_encoder_states)
        config = metadata.get("lora_config")
        layers = {name: {key[len(name) + 1:]: value for key, value in lora_state.items()
                         if key.startswith(name + ".")} for name in ("transformer", "transformer_2")}
        WanPipeline._save_lora_weights(folder, lora_layers=layers, lora_metadata={name: config for name in layers},
                                       safe_serialization=True)
        return folder / LORA_WEIGHT_NAME

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        pipeline_class = self._saved_pipeline_class()
        components = self._components(denoiser, full=True, image_to_video=pipeline_class is WanImageToVideoPipeline)
        pipeline_class(**components).save_pretrained(folder, safe_serialization=True)
        return folder


# --- validation pipelines -----------------------------------------------------------------------------


class _FamilyPrompts:
    """Prompts encoded by the family (the training tokens, memoised) instead of the pipeline's own
    encoder call: the same embeds as training, and no dependency on the pipeline's text cleaning."""

    family: Wan | None = None

    def _get_t5_prompt_embeds(self, prompt=None, num_videos_per_prompt: int = 1, max_sequence_length: int = 226,
                              device=None, dtype=None):
        if self.family is None:
            return super()._get_t5_prompt_embeds(prompt, num_videos_per_prompt, max_sequence_length, device, dtype)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = self.family.validation_text(prompts).repeat_interleave(num_videos_per_prompt, dim=0)
        return embeds.to(device=device or self._execution_device, dtype=dtype or self.text_encoder.dtype)


class WanValidationPipeline(_FamilyPrompts, WanPipeline):
    """``WanPipeline`` with the family's prompt encoding (validation only; saved folders are plain)."""


class WanImageToVideoValidationPipeline(_FamilyPrompts, WanImageToVideoPipeline):
    """``WanImageToVideoPipeline`` with the family's prompt encoding (validation only)."""
