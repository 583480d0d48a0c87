"""HiDream-I1 (Full, Dev, Fast): a rectified-flow transformer with mixture-of-experts blocks and four text encoders.

* **Text.** Read like diffusers' ``HiDreamImagePipeline`` does, ``--tokenizer_max_length`` tokens (128
  by default, the pipeline's ``max_sequence_length``) for every encoder:

  - two CLIPs with projection (long-context CLIP-L and CLIP-G): their projected embeddings,
    concatenated, are the pooled embedding the transformer adds to its timestep embedding;
  - T5: the last hidden states (padding kept, as the pipeline keeps it);
  - Llama 3.1 8B Instruct: the hidden state after every layer; the transformer's ``llama_layers`` names
    the one each block reads. Only those layers are cached (``llama_embeds`` holds them in the order of
    :attr:`HiDream.cached_llama_layers`), which for the released model saves the unused ones.

  The Llama encoder is not part of the HiDream repositories: it loads from the base model's
  ``text_encoder_4`` / ``tokenizer_4`` folders when they exist (a saved pipeline has them), else from
  :data:`LLAMA_MODEL` on the hub. Caption dropout trains with the encoded empty prompt, which is also the
  pipeline's negative prompt.
* **Latents.** FLUX.1's 16-channel VAE posterior, shifted and scaled; the transformer patchifies 2x2
  latent cells itself. A square image may have any size; a non-square one is padded to the
  transformer's ``max_resolution`` token budget, and :meth:`HiDream.predict` refuses one that exceeds it.
* **Objective.** Flow matching: ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``; the transformer gets
  ``1000 s`` as its timestep and predicts the *negative* velocity (the pipeline negates its output), so
  :meth:`HiDream.predict` negates it back. Without ``--flow_schedule_shift`` the sigmas are shifted by the
  checkpoint scheduler's own shift (``shift``, or a UniPC scheduler's ``flow_shift``; 3.0 when it names none).
* **Load balancing.** ``--hidream_use_load_balancing_loss`` adds the routers' auxiliary load-balancing loss
  (:mod:`simpletuner.regularizers.load_balancing`); :meth:`HiDream.router_gates` names the routers.
* **Validation.** HiDream's pipeline scales every requested size to one pixel area (its default
  sample size); the family sets that area from the first ``--validation_resolution`` (else
  ``--resolution``), so validation images come out at the size asked for.
* **LoRA.** The default targets are the attention projections of both streams (``to_q/k/v/out`` and the
  text stream's ``*_t``). ``HiDreamImagePipeline.save_lora_weights`` writes ``transformer.<module
  path>.lora_A/lora_B.weight``, which ``load_lora_weights`` loads and ComfyUI maps for HiDream too
  (``--lora_format comfyui`` adds the ``.alpha`` tensors ComfyUI needs when alpha differs from the rank).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import OneTransformerFamily, TextFolders, load_t5, load_transformer, load_vae

logger = logging.getLogger(__name__)

#: Tokens per encoder when ``--tokenizer_max_length`` is unset: the pipeline's ``max_sequence_length``.
DEFAULT_MAX_TOKENS = 128
#: The pipeline cuts the CLIP inputs at this many tokens (its long-context CLIPs have 248 positions).
CLIP_MAX_TOKENS = 218
#: Where the fourth text encoder comes from when the base model has no ``text_encoder_4`` folder.
LLAMA_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
#: The released Full / Fast checkpoints' scheduler shift, used until the model's own scheduler is read.
RELEASED_SHIFT = 3.0
#: Attention projections of the image and text streams: the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"]


def hidream_text_settings(config) -> dict[str, Any]:
    """The text settings a run uses, with HiDream's defaults filled in for unset options."""
    return {"max_tokens": int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS)}


class HiDream(OneTransformerFamily, ModelFamily):
    family = "hidream"
    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_ATTENTION_TARGETS
    #: Replaced in :meth:`load` by the checkpoint scheduler's own shift.
    default_flow_shift = RELEASED_SHIFT
    flow_patch_size = 2
    #: Dual-stream blocks run first, then single-stream blocks.
    block_list_names = ("double_stream_blocks", "single_stream_blocks")

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_settings = hidream_text_settings(config)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel

        # the transformer first: a bad single file fails before the text encoders' gigabytes load
        self.transformer = load_transformer(self, HiDreamImageTransformer2DModel, "HiDream")
        self._load_clips()
        self.tokenizer_3, self.text_encoder_3 = load_t5(self, TextFolders("tokenizer_3", "text_encoder_3"))
        self.tokenizer_4, self.text_encoder_4 = self._load_llama()
        self.vae = load_vae(self, AutoencoderKL)
        self._scheduler = self._load_scheduler()
        for module in (*self.text_encoder_modules().values(), self.vae, self.transformer):
            self.place(module)  # each was loaded in its dtype already
        self.denoiser = self.transformer
        self.flow_patch_size = self.transformer.config.patch_size
        scheduler_config = self._scheduler.config
        self.default_flow_shift = float(scheduler_config.get("shift") or scheduler_config.get("flow_shift")
                                        or RELEASED_SHIFT)
        self.freeze_encoders()
        logger.info("hidream text: %d tokens per encoder, Llama layers %s cached; default flow shift %.2f "
                    "(the checkpoint scheduler's)", self.text_settings["max_tokens"], self.cached_llama_layers,
                    self.default_flow_shift)

    def _load_clips(self) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        source = self.config_source
        for suffix in ("", "_2"):
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{suffix}",
                                                      **self.base_source(weights=False))
            encoder = self.load_text_encoder(f"text_encoder{suffix}", CLIPTextModelWithProjection, source,
                                             subfolder=f"text_encoder{suffix}", dtype=self.weight_dtype,
                                             **self.base_source())
            setattr(self, f"tokenizer{suffix}", tokenizer)
            setattr(self, f"text_encoder{suffix}", encoder)

    def llama_source(self) -> tuple[str, str | None, dict[str, Any]]:
        """``(path, subfolder prefix, base-source arguments)`` of the Llama encoder: the base model's
        ``text_encoder_4`` when it has one (a local folder with it), else :data:`LLAMA_MODEL`."""
        source = self.config_source
        if (Path(source) / "text_encoder_4").is_dir():
            return source, "4", self.base_source()
        return LLAMA_MODEL, None, {}

    def _load_llama(self):
        from transformers import AutoTokenizer, LlamaForCausalLM

        path, suffix, source = self.llama_source()
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer_{suffix}" if suffix else None,
                                                  **{k: v for k, v in source.items() if k == "revision"})
        tokenizer.pad_token = tokenizer.eos_token  # as the pipeline sets it
        encoder = self.load_text_encoder("text_encoder_4", LlamaForCausalLM, path,
                                         subfolder=f"text_encoder_{suffix}" if suffix else None,
                                         dtype=self.weight_dtype, **source)
        return tokenizer, encoder

    def _load_scheduler(self):
        """The scheduler class the checkpoint names (validation samples with it; training reads its
        shift), or diffusers' flow-matching Euler scheduler for a name diffusers does not have."""
        import diffusers

        config = diffusers.FlowMatchEulerDiscreteScheduler.load_config(
            self.config_source, subfolder="scheduler", **self.base_source(weights=False))
        name = config.get("_class_name", "")
        if not hasattr(diffusers, name):
            logger.warning("hidream: the checkpoint's scheduler %r is not a diffusers class; sampling with "
                           "FlowMatchEulerDiscreteScheduler and its settings instead", name)
        return getattr(diffusers, name, diffusers.FlowMatchEulerDiscreteScheduler).from_config(config)

    def fingerprint_parts(self) -> dict[str, str]:
        """The caption length and the Llama source change every cached prompt embedding."""
        return {**super().fingerprint_parts(), "max_tokens": str(self.text_settings["max_tokens"]),
                "llama": self.llama_source()[0]}

    # --- conditioning and latents ----------------------------------------------------------------------

    @property
    def cached_llama_layers(self) -> list[int]:
        """The Llama hidden states the blocks read (``llama_layers``, each once, in ascending order)."""
        return sorted(set(self.transformer.config.llama_layers))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pooled CLIP embedding, T5's hidden states and the Llama layers the blocks read, exactly
        as the pipeline encodes them."""
        max_tokens = self.text_settings["max_tokens"]
        pooled = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(prompts, padding="max_length", max_length=min(max_tokens, CLIP_MAX_TOKENS),
                               truncation=True, return_tensors="pt")
            pooled.append(encoder(tokens.input_ids.to(self.device))[0])
        t5 = self._tokens(self.tokenizer_3, prompts, max_tokens)
        t5_embeds = self.text_encoder_3(t5.input_ids.to(self.device),
                                        attention_mask=t5.attention_mask.to(self.device))[0]
        llama = self._tokens(self.tokenizer_4, prompts, max_tokens)
        hidden = self.text_encoder_4(llama.input_ids.to(self.device),
                                     attention_mask=llama.attention_mask.to(self.device),
                                     output_hidden_states=True).hidden_states[1:]  # after each layer
        llama_embeds = torch.stack([hidden[layer] for layer in self.cached_llama_layers], dim=1)
        return {"pooled_prompt_embeds": torch.cat(pooled, dim=-1), "t5_embeds": t5_embeds, "llama_embeds": llama_embeds}

    @staticmethod
    def _tokens(tokenizer, prompts: list[str], max_tokens: int):
        return tokenizer(prompts, padding="max_length", max_length=min(max_tokens, tokenizer.model_max_length),
                         truncation=True, add_special_tokens=True, return_tensors="pt")

    def llama_states(self, llama_embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        """The cached Llama layers [B, n, tokens, width] as the transformer indexes them (by layer number)."""
        return {layer: llama_embeds[:, index] for index, layer in enumerate(self.cached_llama_layers)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """The velocity prediction ``eps - x0``, shaped like the latents."""
        self._check_token_budget(noisy_latents)
        output = self.denoiser(
            hidden_states=noisy_latents, timesteps=timesteps, encoder_hidden_states_t5=text["t5_embeds"],
            encoder_hidden_states_llama3=self.llama_states(text["llama_embeds"]),
            pooled_embeds=text["pooled_prompt_embeds"], return_dict=False,
        )[0]
        return -self._as_latents(output, noisy_latents.shape)

    def _as_latents(self, output: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """In training mode the transformer returns its tokens as [B, C, tokens, patch x patch] (padded to
        its token budget for non-square images) instead of an image: put the patches back in place."""
        config = self.denoiser.config
        if not (self.denoiser.training and not config.force_inference_output):
            return output
        batch, channels, height, width = shape
        patch = config.patch_size
        rows, columns = height // patch, width // patch
        output = output[:, :, : rows * columns].reshape(batch, channels, rows, columns, patch, patch)
        return output.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, height, width)

    def _check_token_budget(self, latents: torch.Tensor) -> None:
        """Non-square images are padded to ``max_resolution``'s tokens; more would fail deep in diffusers."""
        height, width = latents.shape[-2:]
        config = self.denoiser.config
        tokens = (height // config.patch_size) * (width // config.patch_size)
        if height != width and tokens > self.denoiser.max_seq:
            scale = self.vae_scale_factor()
            raise ValueError(
                f"hidream: a non-square image of {width * scale}x{height * scale} px needs {tokens} tokens, but this "
                f"transformer takes at most {self.denoiser.max_seq} for non-square images (max_resolution "
                f"{list(config.max_resolution)} latent cells); lower --resolution (and dataset resolutions) to an "
                f"area of at most {config.max_resolution[0] * scale}x{config.max_resolution[1] * scale} px")

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th block (default: all), dual- and single-stream blocks in one sequence."""
        blocks = [*self.transformer.double_stream_blocks, *self.transformer.single_stream_blocks]
        return checkpoint_every_nth_block(self.transformer, blocks, interval)

    def router_gates(self) -> list[torch.nn.Module]:
        """The mixture-of-experts routers of the denoiser, in execution order (for the load-balancing loss)."""
        return [module for module in self.denoiser.modules() if type(module).__name__ == "MoEGate"]

    # --- validation and outputs ------------------------------------------------------------------------

    def _components(self, denoiser: torch.nn.Module | None = None) -> dict[str, Any]:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, tokenizer_2=self.tokenizer_2,
                    text_encoder_2=self.text_encoder_2, tokenizer_3=self.tokenizer_3,
                    text_encoder_3=self.text_encoder_3,
                    tokenizer_4=self.tokenizer_4, text_encoder_4=self.text_encoder_4, vae=self.vae,
                    transformer=denoiser if denoiser is not None else self.denoiser,
                    scheduler=self._scheduler.__class__.from_config(self._scheduler.config))

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        """The stock pipeline with its pixel area set to the validation size (see the module notes)."""
        from diffusers import HiDreamImagePipeline

        pipeline = HiDreamImagePipeline(**self._components(denoiser))
        # the pipeline floors ``size * sqrt(area / requested area)`` to whole patches: a hair above 1 keeps
        # the requested size where float rounding would otherwise drop it by a patch
        pipeline.default_sample_size = self.validation_area_edge() * (1 + 1e-9) / pipeline.vae_scale_factor
        return pipeline

    def validation_area_edge(self) -> float:
        """The edge of the square whose area the pipeline scales every request to: the first
        ``--validation_resolution``, else ``--resolution``, else the pipeline's own 1024 px."""
        from simpletuner.data.buckets import pixel_edge
        from simpletuner.validation.resolutions import parse_resolutions

        config = self.config
        fallback = round(pixel_edge(float(config.resolution), config.resolution_type or "pixel")) \
            if config.resolution else 1024
        width, height = parse_resolutions(config.validation_resolution, fallback)[0]
        return math.sqrt(width * height)

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Validation reads captions at the training length."""
        return {"max_sequence_length": self.text_settings["max_tokens"]}

    def lora_writer_class(self):
        from diffusers import HiDreamImagePipeline

        return HiDreamImagePipeline

    def saved_pipeline(self, denoiser: torch.nn.Module):
        """The stock pipeline, without the validation pixel area :meth:`build_pipeline` sets."""
        from diffusers import HiDreamImagePipeline

        return HiDreamImagePipeline(**self._components(denoiser))
