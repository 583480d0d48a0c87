"""Stable Diffusion 3 / 3.5: an MMDiT (``SD3Transformer2DModel``) trained with rectified flow.

Text conditioning comes from three encoders, as in diffusers' ``StableDiffusion3Pipeline``:

* CLIP-L and CLIP-G (``CLIPTextModelWithProjection``): the penultimate hidden states of each, 77
  tokens, concatenated along the channels; their projected (pooled) outputs, concatenated, are the
  ``pooled_prompt_embeds`` the transformer adds to its timestep embedding;
* T5: the last hidden states of ``--tokenizer_max_length`` tokens (154 by default, the reference
  SimpleTuner's SD 3.5 setting; diffusers' pipeline defaults to 256), with padded positions zeroed
  or kept (``--t5_padding``, kept by default).

The CLIP embeddings are zero-padded to T5's width and put in front of the T5 tokens:
``prompt_embeds`` is ``[77 + T5 tokens, T5 width]`` per prompt.

What caption dropout trains with (``unconditional_text``) and what validation uses as the negative
prompt is the encoded empty prompt, or zeros for its CLIP part (the CLIP tokens and the pooled
embedding, ``--sd3_clip_uncond_behaviour zero``) and/or its T5 part (``--sd3_t5_uncond_behaviour
zero``, which defaults to the CLIP setting).

Latents: the 16-channel VAE's posterior, shifted and scaled, ``(z - shift_factor) * scaling_factor``.
The flow target and sigma sampling are shared (:mod:`simpletuner.methods.sft`); the model is fed
``sigma * 1000`` as its timestep, like the pipeline's FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block

logger = logging.getLogger(__name__)

#: CLIP's context length; SD3 always feeds 77 CLIP tokens.
CLIP_TOKENS = 77
#: T5 tokens when ``--tokenizer_max_length`` is unset (SimpleTuner's SD 3.5 default).
DEFAULT_T5_TOKENS = 154
#: Attention projections of the image stream of every block (and of the second, image-only
#: attention of SD 3.5's MMDiT-X blocks): SimpleTuner's default SD3 LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def sd3_text_settings(config) -> dict[str, Any]:
    """The text settings a run uses, with SD3's defaults filled in for unset options."""
    clip_uncond = config.sd3_clip_uncond_behaviour or "empty_string"
    return {
        "t5_tokens": int(config.tokenizer_max_length or DEFAULT_T5_TOKENS),
        "t5_padding": config.t5_padding or "unmodified",
        "clip_uncond": clip_uncond,
        "t5_uncond": config.sd3_t5_uncond_behaviour or clip_uncond,
    }


class StableDiffusion3(ModelFamily):
    family = "sd3"
    denoiser_name = "transformer"
    default_flow_shift = 3.0

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_settings = sd3_text_settings(config)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        if self.is_single_file():
            self._load_single_file()
        else:
            path, source = self.model_path, dict(revision=self.config.revision)
            weights = dict(variant=self.config.variant, **source)
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **source)
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **source)
            self.tokenizer_3 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **source)
            for name, encoder_class in (("text_encoder", CLIPTextModelWithProjection),
                                        ("text_encoder_2", CLIPTextModelWithProjection),
                                        ("text_encoder_3", T5EncoderModel)):
                setattr(self, name, self.load_text_encoder(name, encoder_class, path, subfolder=name, **weights))
            self.transformer = self.load_denoiser(SD3Transformer2DModel, path, subfolder="transformer", **weights)
            self.vae = self.load_vae(path)
            self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **source)
        self.place_in_weight_dtype(self.frozen_modules() + [self.transformer])  # bf16 or fp32 (fp16 is refused)
        self.denoiser = self.transformer
        self.flow_patch_size = self.transformer.config.patch_size
        self.freeze_encoders()
        settings = self.text_settings
        logger.info("sd3 text: %d T5 tokens (padding %s); unconditional embeds: clip=%s, t5=%s",
                    settings["t5_tokens"], settings["t5_padding"], settings["clip_uncond"], settings["t5_uncond"])

    def _load_single_file(self) -> None:
        from diffusers import StableDiffusion3Pipeline
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        # SD 3.5 single files hold the MMDiT and the VAE; the text encoders, which the files usually
        # lack, come from the flavour's hub folder with the configs.
        pipeline = self.load_single_file_pipeline(StableDiffusion3Pipeline, needs="the diffusers configs and text encoders",
                                                  errors=(OSError, ValueError, SingleFileComponentError))
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3",
                     "transformer"):
            setattr(self, name, getattr(pipeline, name))
        self.vae = self.load_vae(self.model_path) if self.config.pretrained_vae_model_name_or_path else pipeline.vae
        self._scheduler = pipeline.scheduler

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae]

    def noise_scheduler(self):
        return self._scheduler

    def fingerprint_parts(self) -> dict[str, str]:
        """The T5 length and padding change every cached prompt embedding."""
        return {**super().fingerprint_parts(), "t5_tokens": str(self.text_settings["t5_tokens"]),
                "t5_padding": self.text_settings["t5_padding"]}

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self._encode(prompts)

    def text_conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Live encoding for ``--train_text_encoder``: gradients flow into the two CLIPs (trained as
        diffusers' SD3 DreamBooth script trains them). Dropped captions arrive as ``""`` and get
        :meth:`unconditional_text`, as they would from the text cache, so ``--sd3_*_uncond_behaviour
        zero`` still applies."""
        text = self._encode(prompts)
        dropped = torch.tensor([prompt == "" for prompt in prompts], device=text["prompt_embeds"].device)
        if not bool(dropped.any()):
            return text
        unconditional = self.unconditional_text(text)
        return {key: torch.where(dropped.view(-1, *([1] * (value.dim() - 1))), unconditional[key], value)
                for key, value in text.items()}

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Both CLIPs with whatever gradient mode the caller runs in; T5 always without gradients."""
        clip_hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                               return_tensors="pt")
            output = encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
            clip_hidden.append(output.hidden_states[-2])  # the penultimate layer, as the pipeline uses
            pooled.append(output.text_embeds)
        with torch.no_grad():
            t5 = self._t5_hidden_states(prompts)
        clip = torch.cat(clip_hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip.to(t5.dtype), t5], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5_hidden_states(self, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states at ``--tokenizer_max_length`` tokens, padding zeroed with ``--t5_padding zero``."""
        tokens = self.tokenizer_3(prompts, padding="max_length", max_length=self.text_settings["t5_tokens"],
                                  truncation=True, add_special_tokens=True, return_tensors="pt")
        t5 = self.text_encoder_3(tokens.input_ids.to(self.device))[0]
        if self.text_settings["t5_padding"] == "zero":
            t5 = t5 * tokens.attention_mask.to(t5.device, t5.dtype).unsqueeze(-1)
        return t5

    def trainable_text_encoders(self) -> dict[str, torch.nn.Module]:
        """CLIP-L and CLIP-G; T5 stays frozen (no reference trainer trains it by default)."""
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def unconditional_text(self, empty_prompt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The empty prompt's embeds with its CLIP part (CLIP tokens and pooled embedding) and/or its
        T5 part replaced by zeros, as ``--sd3_clip_uncond_behaviour`` / ``--sd3_t5_uncond_behaviour`` say."""
        zero_clip = self.text_settings["clip_uncond"] == "zero"
        zero_t5 = self.text_settings["t5_uncond"] == "zero"
        if not (zero_clip or zero_t5):
            return empty_prompt
        embeds, pooled = empty_prompt["prompt_embeds"], empty_prompt["pooled_prompt_embeds"]
        clip, t5 = embeds[:, :CLIP_TOKENS], embeds[:, CLIP_TOKENS:]
        return {
            "prompt_embeds": torch.cat([torch.zeros_like(clip) if zero_clip else clip,
                                        torch.zeros_like(t5) if zero_t5 else t5], dim=1),
            "pooled_prompt_embeds": torch.zeros_like(pooled) if zero_clip else pooled,
        }

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        return self.denoiser(
            hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
            pooled_projections=text["pooled_prompt_embeds"], return_dict=False,
        )[0]

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th MMDiT block (default: all) in the backward pass."""
        return checkpoint_every_nth_block(self.denoiser, list(self.denoiser.transformer_blocks), interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _pipeline(self, denoiser: torch.nn.Module | None = None):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=denoiser if denoiser is not None else self.denoiser,
            scheduler=self._scheduler.__class__.from_config(self._scheduler.config),
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        """The stock pipeline, except that prompts are encoded by :meth:`encode_prompts` and the
        empty negative prompt is :meth:`unconditional_text`: validation sees the T5 length, padding
        and unconditional embeds that training used."""
        pipeline = self._pipeline(denoiser)
        pipeline.encode_prompt = types.MethodType(_training_encode_prompt(self, pipeline.encode_prompt), pipeline)
        return pipeline

    # --- ControlNet (--controlnet; models/controlnet.py) ----------------------------------------------

    def controlnet_from_denoiser(self, overrides: dict[str, Any] | None) -> torch.nn.Module:
        """The transformer's config as ``SD3ControlNetModel`` (no extra conditioning channels: the control
        image enters as VAE latents), ``overrides`` on top (e.g. ``{"num_layers": 6}``); the embeddings
        and blocks copied from the transformer and the control-input embedding zeroed, as diffusers'
        ``from_transformer`` does."""
        from diffusers import SD3ControlNetModel

        from simpletuner.models.controlnet import new_controlnet

        layout = {**dict(self.denoiser.config), "extra_conditioning_channels": 0}
        return new_controlnet(SD3ControlNetModel, layout, self.denoiser, overrides, zero_init=("pos_embed_input",))

    def control_latents(self, controlnet: torch.nn.Module, control_pixels: torch.Tensor) -> torch.Tensor:
        """The control image as the pipeline gives it to the ControlNet: a VAE latent sample, scaled, and
        shifted only when the ControlNet's config says it feeds real pooled projections (diffusers
        skips the shift for the zero-pooled InstantX layout, the default here)."""
        with torch.no_grad():
            latents = self.vae.encode(control_pixels.to(self.device, self.vae.dtype)).latent_dist.sample()
        shift = 0.0 if controlnet.config.force_zeros_for_pooled_projection else (self.vae.config.shift_factor or 0.0)
        return (latents - shift) * self.vae.config.scaling_factor

    def controlnet_predict(self, controlnet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           text: dict[str, torch.Tensor], control_pixels: torch.Tensor,
                           batch: dict | None = None) -> torch.Tensor:
        embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
        dtype = controlnet.dtype
        control_pooled = torch.zeros_like(pooled) if controlnet.config.force_zeros_for_pooled_projection else pooled
        control_text = embeds.to(dtype) if controlnet.config.joint_attention_dim is not None else None
        residuals = controlnet(hidden_states=noisy_latents.to(dtype), timestep=timesteps,
                               encoder_hidden_states=control_text, pooled_projections=control_pooled.to(dtype),
                               controlnet_cond=self.control_latents(controlnet, control_pixels).to(dtype),
                               return_dict=False)[0]
        return self.denoiser(
            hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled,
            block_controlnet_hidden_states=[residual.to(noisy_latents.dtype) for residual in residuals],
            return_dict=False,
        )[0]

    def controlnet_pipeline(self, controlnet: torch.nn.Module, denoiser: torch.nn.Module | None = None):
        """diffusers' SD3 ControlNet pipeline, encoding prompts as training did (see :meth:`build_pipeline`)."""
        from diffusers import StableDiffusion3ControlNetPipeline

        base = self._pipeline(denoiser)
        pipeline = StableDiffusion3ControlNetPipeline(
            transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
            text_encoder=base.text_encoder, tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
            tokenizer_2=base.tokenizer_2, text_encoder_3=base.text_encoder_3, tokenizer_3=base.tokenizer_3,
            controlnet=controlnet,
        )
        pipeline.encode_prompt = types.MethodType(_training_encode_prompt(self, pipeline.encode_prompt), pipeline)
        return pipeline

    def controlnet_image_argument(self) -> str:
        return "control_image"

    def lora_target_modules(self) -> list[str]:
        return list(TRANSFORMER_ATTENTION_TARGETS)

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """``StableDiffusion3Pipeline.save_lora_weights``: ``transformer.*`` and, with
        ``--train_text_encoder``, ``text_encoder.*`` / ``text_encoder_2.*`` keys in one file that the
        pipeline's ``load_lora_weights`` reads back."""
        from diffusers import StableDiffusion3Pipeline

        from simpletuner.models.sdxl import inference_lora_config

        states = text_encoder_states or {}
        encoder_config = inference_lora_config(metadata.get("text_encoder_lora_config"))
        StableDiffusion3Pipeline.save_lora_weights(
            folder, transformer_lora_layers=lora_state, safe_serialization=True,
            transformer_lora_adapter_metadata=metadata.get("lora_config"),
            text_encoder_lora_layers=states.get("text_encoder"),
            text_encoder_lora_adapter_metadata=encoder_config if states.get("text_encoder") else None,
            text_encoder_2_lora_layers=states.get("text_encoder_2"),
            text_encoder_2_lora_adapter_metadata=encoder_config if states.get("text_encoder_2") else None,
        )
        return folder / "pytorch_lora_weights.safetensors"

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        self._pipeline(denoiser).save_pretrained(folder, safe_serialization=True)
        return folder


def _training_encode_prompt(family: StableDiffusion3, stock):
    """A replacement for ``StableDiffusion3Pipeline.encode_prompt`` (same arguments and results) that
    encodes with the family's settings; precomputed embeddings go to the stock method."""

    def encode_prompt(pipeline, prompt=None, prompt_2=None, prompt_3=None, device=None, num_images_per_prompt=1,
                      do_classifier_free_guidance=True, negative_prompt=None, negative_prompt_2=None,
                      negative_prompt_3=None, prompt_embeds=None, negative_prompt_embeds=None, **rest):
        if prompt is None or prompt_2 or prompt_3 or negative_prompt_2 or negative_prompt_3 \
                or prompt_embeds is not None or negative_prompt_embeds is not None:
            return stock(prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, device=device,
                         num_images_per_prompt=num_images_per_prompt,
                         do_classifier_free_guidance=do_classifier_free_guidance, negative_prompt=negative_prompt,
                         negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **rest)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        positive = family.encode_prompts(prompts)
        negative = {"prompt_embeds": None, "pooled_prompt_embeds": None}
        if do_classifier_free_guidance:
            if negative_prompt:
                negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                negative = family.encode_prompts(negatives)
            else:
                negative = family.unconditional_text(family.encode_prompts([""] * len(prompts)))

        def per_image(tensor):
            return None if tensor is None else tensor.repeat_interleave(num_images_per_prompt, dim=0)

        return (per_image(positive["prompt_embeds"]), per_image(negative["prompt_embeds"]),
                per_image(positive["pooled_prompt_embeds"]), per_image(negative["pooled_prompt_embeds"]))

    return encode_prompt
