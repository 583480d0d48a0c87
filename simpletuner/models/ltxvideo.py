"""LTX-Video (Lightricks): a rectified-flow video transformer over a causal, heavily compressed VAE.

* **Text.** One T5 encoder, as in diffusers' ``LTXPipeline``: T5's last hidden states of
  ``--tokenizer_max_length`` tokens (128 by default, the pipelines' length), computed without an
  attention mask inside T5, plus the token mask, which the transformer applies in cross-attention.
  Caption dropout trains with the encoded empty prompt, the pipelines' default negative prompt.
* **Latents.** ``AutoencoderKLLTXVideo`` turns a clip of ``8k + 1`` frames into ``k + 1`` latent
  frames, 32x smaller per side for the released models (:meth:`LTXVideo.temporal_compression`,
  :meth:`LTXVideo.vae_scale_factor`). Its encoder is causal: the first latent frame depends on the
  first picture only, so the image-to-video conditioning latent of a clip *is* its first latent frame
  and needs no cache of its own. Pictures (image datasets) are clips of one frame. Training latents
  are the posterior sample normalised per channel with the VAE's ``latents_mean`` / ``latents_std``
  (and ``scaling_factor``), as the pipelines do before the transformer sees them.
* **Model call.** :meth:`LTXVideo.predict` packs ``[B, C, F, H, W]`` latents into tokens the way the
  pipelines do (``LTXPipeline._pack_latents``: frame, row, column order), tells the rotary embedding
  the clip's frame rate (``rope_interpolation_scale`` = temporal compression / fps, then the spatial
  compression twice; the batch's ``frame_rate``, else ``--framerate``, else 30 like the data path),
  and unpacks the prediction. The timestep is ``sigma * 1000``, one per sample, or one per latent
  frame (``[B, F]``, e.g. image-to-video or causal SFT), which becomes one per token.
* **Objective.** Flow matching (velocity ``eps - x0``). Without ``--flow_schedule_shift`` the sigmas
  are shifted like the checkpoint's own sampler (dynamic shift ``exp(mu)``, ``mu`` on the line
  through its ``base_shift`` at ``base_image_seq_len`` tokens and ``max_shift`` at
  ``max_image_seq_len``) for a clip of :data:`SHIFT_REFERENCE_FRAMES` frames at ``--resolution``.
* **Image-to-video** (``--ltx_train_mode i2v``, :class:`FirstFrameSettings`). The first latent frame of
  a conditioned sample (a ``--ltx_i2v_prob`` share of them, all with ``--ltx_protect_first_frame``) is
  the picture the video starts from: the training method (:mod:`simpletuner.methods.sft`, through
  :meth:`LTXVideo.first_frame_conditioning`) puts it back clean -- or at the small noise level
  ``--ltx_partial_noise_fraction`` --, gives its tokens that level as their timestep, exactly what
  ``LTXImageToVideoPipeline`` does with ``t * (1 - conditioning_mask)``, and leaves it out of the loss.
  The other samples train text-to-video.
* **LoRA.** The attention projections of every block (self- and cross-attention,
  :data:`DEFAULT_LORA_TARGETS`); ``--peft_lora_target_modules`` picks others (e.g. the feed-forwards
  ``ff.net.0.proj`` / ``ff.net.2``). Files are written by ``LTXPipeline.save_lora_weights``
  (``transformer.<module path>.lora_A/lora_B.weight``) and load with ``load_lora_weights`` in
  ``LTXPipeline`` and ``LTXImageToVideoPipeline``.
* **Validation.** ``LTXPipeline`` (``LTXImageToVideoPipeline`` in i2v mode) with the training T5
  length, the frame rate above and, for VAEs that decode with a timestep (0.9.1 and later), a small
  decode timestep and noise scale (:data:`DECODE_TIMESTEP`, as in diffusers' LTX-Video examples).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import LTXImageToVideoPipeline, LTXPipeline

from simpletuner.models.base import CleanFirstFrame, ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import (DynamicShiftLine, load_t5, load_transformer, load_vae,
                                           sampler_resolution_shift, save_transformer_lora)

logger = logging.getLogger(__name__)

#: T5 tokens when ``--tokenizer_max_length`` is unset: what LTX-Video's pipelines use.
DEFAULT_T5_TOKENS = 128
#: The clip length (pixel frames) the default flow shift is computed for: LTX-Video's usual 49-frame
#: training clip, 7 latent frames.
SHIFT_REFERENCE_FRAMES = 49
#: Module-name endings a default LoRA adapts: q/k/v/out of self-attention (``attn1``) and
#: cross-attention (``attn2``) in every transformer block.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: ``--validation_guidance`` when unset: the classifier-free guidance LTX-Video's pipelines default to.
DEFAULT_VALIDATION_GUIDANCE = 3.0
#: The negative prompt validation uses when unset (the generic image one does not suit video).
DEFAULT_NEGATIVE_PROMPT = "worst quality, blurry, jittery motion, distorted"
#: VAE decode timestep and noise scale for timestep-conditioned decoders (LTX-Video 0.9.1+).
DECODE_TIMESTEP = 0.05
DECODE_NOISE_SCALE = 0.025
#: The dynamic-shift line of LTX-Video's sampler, for scheduler configs that leave it out.
SHIFT_LINE = DynamicShiftLine(base_seq_len=1024, max_seq_len=4096, base_mu=0.95, max_mu=2.05)


class FrameCountError(ValueError):
    """A clip whose frame count the VAE cannot encode; the message says which counts it accepts."""


# --- image-to-video ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstFrameSettings:
    """How ``--ltx_train_mode i2v`` treats the first latent frame.

    Attributes:
        image_to_video: False for ``t2v`` (every frame noised and learnt alike).
        probability: share of samples trained image-to-video (``--ltx_i2v_prob``, 1.0 when unset or
            with ``--ltx_protect_first_frame``); the others train text-to-video.
        noise_level: the sigma their first frame sits at (``--ltx_partial_noise_fraction``, 0 = clean).
    """

    image_to_video: bool = False
    probability: float = 1.0
    noise_level: float = 0.0

    @classmethod
    def from_config(cls, config) -> "FirstFrameSettings":
        if (config.ltx_train_mode or "t2v") != "i2v":
            return cls()
        if config.ltx_protect_first_frame:
            return cls(True)
        probability, level = config.ltx_i2v_prob, config.ltx_partial_noise_fraction
        return cls(True, 1.0 if probability is None else float(probability), float(level or 0.0))


# --- the family ------------------------------------------------------------------------------------------


class LTXVideo(ModelFamily):
    family = "ltxvideo"
    denoiser_name = "transformer"
    #: The data path may hand :meth:`encode_images` clips ``[B, C, F, H, W]``.
    encodes_video = True
    #: Replaced in :meth:`load` by the checkpoint sampler's shift at the training resolution.
    default_flow_shift = 1.0
    flow_patch_size = 1

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.first_frame = FirstFrameSettings.from_config(config)
        self.t5_tokens = int(config.tokenizer_max_length or DEFAULT_T5_TOKENS)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = self._load_transformer()  # first: a bad single file fails before T5 loads
        self.tokenizer, self.text_encoder = self._load_t5()
        self.vae = self._load_vae()
        self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.config_source, subfolder="scheduler",
                                                                          **self.base_source(weights=False))
        for module in (self.text_encoder, self.vae, self.transformer):
            module.to(self.device)  # each was loaded in its dtype already
        self.denoiser = self.transformer
        self.freeze_encoders()
        self.default_flow_shift = self.resolution_shift()
        logger.info("ltxvideo: %d T5 tokens; clips of %dk+1 frames, %d px per latent cell; default flow shift %.3f; "
                    "%s", self.t5_tokens, self.temporal_compression(), self.vae_scale_factor(),
                    self.default_flow_shift, self._mode_description())

    def _mode_description(self) -> str:
        settings = self.first_frame
        if not settings.image_to_video:
            return "text-to-video"
        return (f"image-to-video on {settings.probability:.0%} of samples (first frame at noise level "
                f"{settings.noise_level:g})")

    def _load_transformer(self):
        from diffusers import LTXVideoTransformer3DModel

        return load_transformer(self, LTXVideoTransformer3DModel, "LTX-Video")

    def _load_t5(self):
        return load_t5(self)

    def _load_vae(self):
        """The video VAE (the base model's without ``--variant``), in fp32 unless the run is bf16."""
        from diffusers import AutoencoderKLLTXVideo

        return load_vae(self, AutoencoderKLLTXVideo, with_variant=False)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.vae]

    def noise_scheduler(self):
        return self._scheduler

    def fingerprint_parts(self) -> dict[str, str]:
        """The T5 source and length change every cached prompt embedding."""
        return {**super().fingerprint_parts(),
                "t5": str(self.config.pretrained_t5_model_name_or_path or self.config_source),
                "t5_tokens": str(self.t5_tokens)}

    # --- geometry --------------------------------------------------------------------------------------

    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (32 for the released VAEs)."""
        return int(self.vae.spatial_compression_ratio)

    def temporal_compression(self) -> int:
        """Pixel frames per latent frame after the first (8 for the released VAEs)."""
        return int(self.vae.temporal_compression_ratio)

    def check_frame_count(self, frames: int) -> None:
        """Refuse a clip the causal VAE would cut or pad (it encodes 1 + 8k frames), naming the
        accepted counts around it."""
        if self.accepted_frame_count(frames) == frames:
            return
        below = self.accepted_frame_count(frames) or 1
        raise FrameCountError(f"LTX-Video's VAE encodes clips of {self.accepted_frame_counts_text()} frames; got "
                              f"{frames}. Use {below} or {below + self.temporal_compression()} frames (num_frames in "
                              "the dataset's \"video\" object)")

    def resolution_shift(self, frames: int = SHIFT_REFERENCE_FRAMES) -> float:
        """The shift the checkpoint's sampler uses for a ``frames``-frame clip at ``--resolution``: ``exp(mu)``
        for a dynamic-shift scheduler (LTX-Video's), its fixed ``shift`` otherwise."""
        return sampler_resolution_shift(self, self._scheduler.config, SHIFT_LINE, self.latent_frame_count(frames))

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """T5's hidden states and token mask, tokenized like the pipelines (T5 itself runs unmasked)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.t5_tokens, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        embeds = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return {"prompt_embeds": embeds, "attention_mask": tokens.attention_mask.to(self.device)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The VAE posterior of clips ``[B, 3, F, H, W]`` (F = 8k+1) or pictures ``[B, 3, H, W]``
        (one-frame clips); ``latent_mean`` / ``latent_std`` are ``[B, C, k+1, H/32, W/32]``."""
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        self.check_frame_count(int(pixels.shape[2]))
        posterior = self.vae.encode(pixels.to(self.device, dtype=self.vae.dtype)).latent_dist
        return {"latent_mean": posterior.mean.float(), "latent_std": posterior.std.float()}

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B, C, F, H, W]`` to what the transformer works on (the pipelines' normalisation)."""
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        return (latents - mean) * self.vae.config.scaling_factor / std

    def latents_from_cache(self, cached: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, normalised per channel."""
        mean, std = cached["latent_mean"], cached["latent_std"]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return self.normalize_latents(mean + std * noise)

    def default_frame_rate(self) -> float:
        """Frames per second of clips whose rate is unknown (and of validation videos, which are written
        at that rate): ``--framerate``, else the data path's default for files that declare none."""
        from simpletuner.data.settings import DEFAULT_FRAMERATE

        return float(self.config.framerate or DEFAULT_FRAMERATE)

    def rope_interpolation_scale(self, batch: dict | None, count: int, device: torch.device):
        """``(temporal compression / fps, spatial compression, spatial compression)`` for the rotary
        embedding: the frame rate of each clip tells the transformer how far apart its latent frames are.
        Clips of different rates in one batch get a per-sample time scale."""
        spatial = float(self.vae_scale_factor())
        rates = batch.get("frame_rate") if batch else None
        if rates is None:
            rate = self.default_frame_rate()
            return (self.temporal_compression() / rate, spatial, spatial)
        rates = torch.as_tensor(rates, dtype=torch.float32).reshape(-1)
        if bool((rates == rates[0]).all()):
            return (self.temporal_compression() / float(rates[0]), spatial, spatial)
        return (self.temporal_compression() / rates.to(device).view(count, 1, 1, 1, 1), spatial, spatial)

    def transformer_timesteps(self, timesteps: torch.Tensor, latents_shape) -> torch.Tensor:
        """``[B]`` stays one per sample; ``[B, F]`` (one per latent frame) becomes one per token."""
        if timesteps.dim() == 1:
            return timesteps.float()
        from simpletuner.objectives.first_frame import token_timesteps

        config = self.transformer.config
        return token_timesteps(timesteps.float(), latents_shape, (config.patch_size_t, config.patch_size,
                                                                  config.patch_size))

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """Pack the clip into tokens, run the transformer, unpack its velocity to ``[B, C, F, H, W]``."""
        count, _, frames, height, width = noisy_latents.shape
        config = self.transformer.config
        p, p_t = config.patch_size, config.patch_size_t
        tokens = LTXPipeline._pack_latents(noisy_latents, p, p_t)
        output = self.denoiser(
            hidden_states=tokens, encoder_hidden_states=text["prompt_embeds"],
            timestep=self.transformer_timesteps(timesteps, noisy_latents.shape).to(noisy_latents.device),
            encoder_attention_mask=text["attention_mask"], num_frames=frames // p_t, height=height // p,
            width=width // p, rope_interpolation_scale=self.rope_interpolation_scale(batch, count, noisy_latents.device),
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(output, frames // p_t, height // p, width // p, p, p_t)

    # --- image-to-video --------------------------------------------------------------------------------

    def first_frame_conditioning(self, batch: dict, latents: torch.Tensor,
                                 generator: torch.Generator | None = None) -> CleanFirstFrame | None:
        """Image-to-video runs: the samples of this batch conditioned on their first latent frame (each
        with ``--ltx_i2v_prob``; drawn from ``generator`` or the global RNG, none drawn at 1) and the
        noise level that frame keeps. None in text-to-video runs and for one-frame clips (pictures),
        which have no frame to continue."""
        settings = self.first_frame
        if not settings.image_to_video or latents.dim() != 5 or latents.shape[2] < 2:
            return None
        from simpletuner.objectives.first_frame import conditioned_samples

        conditioned = conditioned_samples(latents.shape[0], settings.probability, device=latents.device,
                                          generator=generator)
        return CleanFirstFrame(conditioned, noise_level=settings.noise_level)

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th transformer block (default: all)."""
        return checkpoint_every_nth_block(self.transformer, list(self.transformer.transformer_blocks), interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _components(self, denoiser: torch.nn.Module | None = None) -> dict[str, Any]:
        return dict(scheduler=self._scheduler.__class__.from_config(self._scheduler.config), vae=self.vae,
                    text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                    transformer=denoiser if denoiser is not None else self.denoiser)

    @property
    def validation_takes_image(self) -> bool:
        """Image-to-video runs validate from a first picture (``LTXImageToVideoPipeline``'s ``image``)."""
        return self.first_frame.image_to_video

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        """``LTXPipeline`` for text-to-video, ``LTXImageToVideoPipeline`` for image-to-video runs."""
        cls = LTXImageToVideoPipeline if self.validation_takes_image else LTXPipeline
        return cls(**self._components(denoiser))

    def validation_defaults(self) -> dict[str, Any]:
        return {"validation_guidance": DEFAULT_VALIDATION_GUIDANCE,
                "validation_negative_prompt": DEFAULT_NEGATIVE_PROMPT}

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """The training T5 length and frame rate; decode settings for timestep-conditioned VAEs."""
        arguments: dict[str, Any] = {"max_sequence_length": self.t5_tokens,
                                     "frame_rate": self.default_frame_rate()}
        if self.vae.config.timestep_conditioning:
            arguments.update(decode_timestep=DECODE_TIMESTEP, decode_noise_scale=DECODE_NOISE_SCALE)
        return arguments

    def lora_target_modules(self) -> list[str]:
        return list(DEFAULT_LORA_TARGETS)

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        return save_transformer_lora(self, LTXPipeline, folder, lora_state, metadata, text_encoder_states)

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        LTXPipeline(**self._components(denoiser)).save_pretrained(folder, safe_serialization=True)
        return folder
