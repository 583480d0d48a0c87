"""FLUX.1 ([dev], [schnell], Krea [dev]): a rectified-flow transformer over packed latent tokens.

* **Text.** Two encoders, as in diffusers' ``FluxPipeline``: CLIP-L's pooled output
  (``pooled_prompt_embeds``, added to the timestep embedding) and T5's last hidden states
  (``prompt_embeds``, the text tokens of the joint attention). T5 reads ``--tokenizer_max_length``
  tokens: 512 by default, 256 for models without a guidance embedding ([schnell] was trained with
  256). ``--t5_padding zero`` zeroes the padded positions of the cached T5 embeddings
  (``unmodified``, the default, keeps what T5 produced, as the pipeline does). The T5 attention mask
  is cached with every prompt (``attention_mask``); ``--flux_attention_masked_training`` uses it to
  keep the padded text tokens out of the transformer's attention, in training and at validation.
  Caption dropout trains with the encoded empty prompt, the pipeline's negative prompt.
* **Latents.** The 16-channel VAE posterior, ``(z - shift_factor) * scaling_factor``. The
  transformer sees them packed into tokens of 2x2 latent cells (64 channels each) with 3-axis
  position ids; :meth:`Flux.predict` packs its input and unpacks the prediction back to the latent
  shape, so the shared loss never sees tokens.
* **Objective.** Flow matching (``x_s = (1 - s) x0 + s eps``, target ``eps - x0``), the timestep fed
  as ``s`` (diffusers' Flux transformer multiplies by 1000 itself). Without ``--flow_schedule_shift``
  the sigmas are shifted like the checkpoint's own sampler at the training resolution: [dev]-style
  schedulers use a dynamic shift ``exp(mu)``, ``mu`` interpolated from the image token count
  (0.5 at 256 tokens, 1.15 at 4096, i.e. about 3.2 for 1024 px and 1.9 for 512 px), computed once
  from ``--resolution``; [schnell]'s fixed-shift scheduler says 1.0. ``--flow_schedule_auto_shift``
  computes the same shift per batch instead (mixed resolutions). ``--flux_fast_schedule`` draws the
  few noise levels a four-step sampler visits (:mod:`simpletuner.objectives.flow`).
* **Guidance.** Guidance-distilled checkpoints ([dev], Krea) embed a guidance number next to the
  timestep. Training feeds ``--flux_guidance_value`` (``constant`` mode, default 1.0) or a per-sample
  uniform draw from ``[--flux_guidance_min, --flux_guidance_max]`` (``random-range``). Models without
  the embedding ([schnell]) ignore it.
* **LoRA.** :data:`LORA_TARGET_PRESETS` (``--flux_lora_target``, default ``mmdit``) name modules of
  diffusers' ``FluxTransformer2DModel``. The file is written by ``FluxPipeline.save_lora_weights``
  (``transformer.<module path>.lora_A/lora_B.weight``) and loads with ``FluxPipeline.load_lora_weights``.
* **Validation.** ``FluxPipeline`` with three additions (:class:`FluxValidationPipeline`): prompts
  are encoded exactly as for training (T5 length, padding, memoised per prompt), the T5 mask reaches
  the attention with masked training, and real classifier-free guidance (``true_cfg_scale``, from
  ``--validation_guidance_real``) uses the empty prompt when the negative prompt is empty (the stock
  pipeline would silently skip CFG) and can stay off for the first
  ``--validation_no_cfg_until_timestep`` steps. ``--validation_guidance`` is the
  *embedded* guidance of distilled models (3.5 is FLUX.1 [dev]'s usual value).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import (DynamicShiftLine, TextFolders, load_t5, load_transformer, load_vae,
                                           sampler_resolution_shift, save_transformer_lora)

logger = logging.getLogger(__name__)

#: CLIP's context length; FLUX.1 always reads 77 CLIP tokens for the pooled embedding.
CLIP_TOKENS = 77
#: T5 tokens when ``--tokenizer_max_length`` is unset: what [dev] was trained with, and [schnell].
DEFAULT_T5_TOKENS = 512
GUIDANCE_FREE_T5_TOKENS = 256
#: ``--validation_guidance`` when unset: the embedded guidance FLUX.1 [dev] samples well with.
DEFAULT_VALIDATION_GUIDANCE = 3.5
#: ``--flux_guidance_value`` when unset: the distilled guidance at which LoRAs are usually trained.
DEFAULT_GUIDANCE = 1.0
#: The dynamic-shift line of FLUX.1 [dev]'s sampler, for scheduler configs that leave it out.
SHIFT_LINE = DynamicShiftLine(base_seq_len=256, max_seq_len=4096, base_mu=0.5, max_mu=1.15)

# --- LoRA target presets ---------------------------------------------------------------------------
# Suffixes of module names in diffusers' FluxTransformer2DModel (PEFT adapts every module whose name
# ends in ".<entry>" or equals it). Double-stream blocks are ``transformer_blocks.N``, single-stream
# blocks ``single_transformer_blocks.N``.

#: Attention of the image stream: q/k/v in every block (single blocks attend over text and image
#: together) and the double blocks' image output projection.
IMAGE_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
#: Attention of the text stream of the double blocks.
TEXT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TEXT_FEED_FORWARD = ("ff_context.net.0.proj", "ff_context.net.2")
IMAGE_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
#: The single blocks' MLP input; their output projection is listed per block (see
#: :func:`single_block_outputs`) so that the transformer's final ``proj_out`` is not adapted too.
SINGLE_MLP = ("proj_mlp",)
#: The adaptive-norm modulation of every block.
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")
#: The image patch embedding.
EMBEDDER = ("x_embedder",)
#: ``tiny`` / ``nano``: single blocks 7 and 20 of FLUX.1's 38, as fractions of the depth, so the
#: presets mean the same on a model with fewer single blocks.
TINY_BLOCK_FRACTIONS = (7 / 38, 20 / 38)
NANO_BLOCK_FRACTIONS = (7 / 38,)

#: Presets that need ControlNet training, which simpletuner does not do; refused by the config rules.
CONTROLNET_PRESETS = ("controlnet", "all+ffs+embedder+controlnet")


def single_block_outputs(num_single_layers: int, fractions: tuple[float, ...] | None = None) -> list[str]:
    """``single_transformer_blocks.N.proj_out`` for every single block, or for the blocks at
    ``fractions`` of the depth."""
    if fractions is None:
        indices = range(num_single_layers)
    else:
        indices = sorted({min(num_single_layers - 1, round(f * num_single_layers)) for f in fractions})
    return [f"single_transformer_blocks.{index}.proj_out" for index in indices]


def lora_target_preset(preset: str, num_single_layers: int) -> list[str]:
    """The module names ``--flux_lora_target preset`` adapts in a transformer with
    ``num_single_layers`` single-stream blocks."""
    feed_forwards = [*IMAGE_FEED_FORWARD, *TEXT_FEED_FORWARD, *SINGLE_MLP, *single_block_outputs(num_single_layers)]
    presets = {
        "mmdit": [*IMAGE_ATTENTION],
        "context": [*TEXT_ATTENTION],
        "context+ffs": [*TEXT_ATTENTION, *TEXT_FEED_FORWARD],
        "all": [*IMAGE_ATTENTION, *TEXT_ATTENTION],
        "all+ffs": [*IMAGE_ATTENTION, *TEXT_ATTENTION, *feed_forwards],
        "all+ffs+embedder": [*IMAGE_ATTENTION, *TEXT_ATTENTION, *feed_forwards, *EMBEDDER],
        "ai-toolkit": [*IMAGE_ATTENTION, *TEXT_ATTENTION, *feed_forwards, *MODULATION],
        "tiny": single_block_outputs(num_single_layers, TINY_BLOCK_FRACTIONS),
        "nano": single_block_outputs(num_single_layers, NANO_BLOCK_FRACTIONS),
    }
    if preset not in presets:
        raise ValueError(f"unknown --flux_lora_target {preset!r}; choose one of {', '.join(presets)}")
    return presets[preset]


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuidanceSettings:
    """The guidance number fed to a guidance-distilled transformer while training."""

    mode: str = "constant"
    value: float = DEFAULT_GUIDANCE
    low: float | None = None
    high: float | None = None

    @classmethod
    def from_config(cls, config) -> "GuidanceSettings":
        value = config.flux_guidance_value
        return cls(mode=config.flux_guidance_mode or "constant",
                   value=DEFAULT_GUIDANCE if value is None else float(value),
                   low=config.flux_guidance_min, high=config.flux_guidance_max)

    def sample(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """One guidance value per sample (float32). The random draw uses the global generator, which
        the trainer seeds per batch, so resumed runs draw the same values."""
        if self.mode == "random-range":
            values = self.low + (self.high - self.low) * torch.rand(batch_size)
        else:
            values = torch.full((batch_size,), self.value)
        return values.to(device=device, dtype=torch.float32)


def flux_text_settings(config, has_guidance_embedding: bool = True) -> dict[str, Any]:
    """The text settings a run uses, with FLUX.1's defaults filled in for unset options."""
    default = DEFAULT_T5_TOKENS if has_guidance_embedding else GUIDANCE_FREE_T5_TOKENS
    return {
        "t5_tokens": int(config.tokenizer_max_length or default),
        "t5_padding": config.t5_padding or "unmodified",
    }


def joint_attention_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """A boolean key mask over the joint sequence (text tokens first, then image tokens): padded
    text tokens are hidden, every image token is visible. ``text_mask`` may arrive as floats."""
    text = text_mask > 0.5
    image = torch.ones(text.shape[0], image_tokens, dtype=torch.bool, device=text.device)
    return torch.cat([text, image], dim=1)


# --- the family -------------------------------------------------------------------------------------


class Flux(ModelFamily):
    family = "flux"
    denoiser_name = "transformer"
    #: Replaced in :meth:`load` by the checkpoint sampler's shift at the training resolution.
    default_flow_shift = 3.0
    flow_patch_size = 2

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.guidance = GuidanceSettings.from_config(config)
        self.masked_training = bool(config.flux_attention_masked_training)
        self._validation_prompts: dict[str, dict[str, torch.Tensor]] = {}

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = self._load_transformer()  # first: a bad single file fails before the 10 GB of T5
        if self.config.control:  # --control: room for the control tokens in the input (models/flux_control.py)
            from simpletuner.models.flux_control import widen_input_embedding

            widen_input_embedding(self.transformer)
        self.tokenizer, self.text_encoder = self._load_clip()
        self.tokenizer_2, self.text_encoder_2 = self._load_t5()
        self.vae = self._load_vae()
        self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            self.config_source, subfolder="scheduler", **self.base_source(weights=False))
        for module in (self.text_encoder, self.text_encoder_2, self.vae, self.transformer):
            module.to(self.device)  # each was loaded in its dtype already (no fp32 copy of 12B weights)
        self.denoiser = self.transformer
        self.freeze_encoders()
        self.text_settings = flux_text_settings(self.config, self.has_guidance_embedding)
        self.default_flow_shift = self._resolution_shift()
        if not self.has_guidance_embedding and self._guidance_options_set():
            logger.warning("flux: this transformer has no guidance embedding (FLUX.1 [schnell]-style); the "
                           "--flux_guidance_* options have no effect")
        logger.info("flux text: %d T5 tokens (padding %s), attention masking %s; guidance %s; default flow shift %.3f",
                    self.text_settings["t5_tokens"], self.text_settings["t5_padding"],
                    "on" if self.masked_training else "off",
                    self.guidance if self.has_guidance_embedding else "none (no guidance embedding)",
                    self.default_flow_shift)

    def _load_t5(self):
        """T5 from the base model's ``tokenizer_2``/``text_encoder_2`` or ``--pretrained_t5_model_name_or_path``."""
        return load_t5(self, TextFolders(tokenizer="tokenizer_2", encoder="text_encoder_2"))

    def _load_transformer(self):
        from diffusers import FluxTransformer2DModel

        return load_transformer(self, FluxTransformer2DModel, "Flux")

    def _load_vae(self):
        from diffusers import AutoencoderKL

        return load_vae(self, AutoencoderKL)

    def _load_clip(self):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(self.config_source, subfolder="tokenizer",
                                                  **self.base_source(weights=False))
        encoder = self.load_text_encoder("text_encoder", CLIPTextModel, self.config_source, subfolder="text_encoder",
                                         dtype=self.weight_dtype, **self.base_source())
        return tokenizer, encoder

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def _guidance_options_set(self) -> bool:
        return any(getattr(self.config, name) is not None for name in
                   ("flux_guidance_mode", "flux_guidance_value", "flux_guidance_min", "flux_guidance_max"))

    def _resolution_shift(self) -> float:
        """The shift the checkpoint's sampler uses for images of ``--resolution``: ``exp(mu)`` from
        the token count for dynamic-shift schedulers ([dev]), the fixed ``shift`` otherwise."""
        return sampler_resolution_shift(self, self._scheduler.config, SHIFT_LINE)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2, self.vae]

    def noise_scheduler(self):
        return self._scheduler

    def fingerprint_parts(self) -> dict[str, str]:
        """The T5 source, length and padding change every cached prompt embedding."""
        return {**super().fingerprint_parts(),
                "t5": str(self.config.pretrained_t5_model_name_or_path or self.config_source),
                "t5_tokens": str(self.text_settings["t5_tokens"]), "t5_padding": self.text_settings["t5_padding"]}

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """CLIP's pooled output, T5's hidden states and T5's attention mask, tokenized like the
        pipeline (T5 without an attention mask inside the encoder, as ``FluxPipeline`` runs it)."""
        return self.text_conditioning(prompts)

    def text_conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`encode_prompts` with gradients flowing into CLIP-L, the encoder ``--train_text_encoder``
        trains (as diffusers' and kohya's FLUX scripts do); T5 always runs without gradients."""
        clip = self.tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                              return_tensors="pt")
        pooled = self.text_encoder(clip.input_ids.to(self.device), output_hidden_states=False).pooler_output
        tokens = self.tokenizer_2(prompts, padding="max_length", max_length=self.text_settings["t5_tokens"],
                                  truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            embeds = self.text_encoder_2(tokens.input_ids.to(self.device), output_hidden_states=False)[0]
        if self.text_settings["t5_padding"] == "zero":
            embeds = embeds * mask.to(embeds.dtype).unsqueeze(-1)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled.to(embeds.dtype), "attention_mask": mask}

    def trainable_text_encoders(self) -> dict[str, torch.nn.Module]:
        """CLIP-L, whose pooled output conditions every block; T5 stays frozen."""
        return {"text_encoder": self.text_encoder}

    def training_guidance(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """The guidance embedding input for a batch; None for transformers without one."""
        if not self.has_guidance_embedding:
            return None
        return self.guidance.sample(batch_size, device)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """Pack the latents into 2x2-cell tokens, run the transformer, unpack its prediction."""
        count, channels, height, width = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        tokens = FluxPipeline._pack_latents(noisy_latents, count, channels, height, width)
        if self.config.control:  # --control: each token carries the control image's cells after its own
            from simpletuner.methods.controlnet import control_pixels_of
            from simpletuner.models.flux_control import control_tokens

            tokens = torch.cat([tokens, control_tokens(self, control_pixels_of(batch), dtype)], dim=2)
        image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, device, dtype)
        embeds = text["prompt_embeds"]
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        extra = {}
        if self.masked_training:
            extra["joint_attention_kwargs"] = {"attention_mask": joint_attention_mask(text["attention_mask"],
                                                                                      tokens.shape[1])}
        output = self.denoiser(
            hidden_states=tokens, timestep=timesteps.float() / 1000, guidance=self.training_guidance(count, device),
            pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=embeds, txt_ids=text_ids,
            img_ids=image_ids, return_dict=False, **extra,
        )[0]
        scale = self.vae_scale_factor()
        return FluxPipeline._unpack_latents(output, height * scale, width * scale, scale)

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th block (default: all), double and single blocks counted
        in one sequence."""
        blocks = [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]
        return checkpoint_every_nth_block(self.transformer, blocks, interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _components(self, denoiser: torch.nn.Module | None = None) -> dict[str, Any]:
        return dict(
            scheduler=self._scheduler.__class__.from_config(self._scheduler.config), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, transformer=denoiser if denoiser is not None else self.denoiser,
        )

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        if self.config.control:  # --control: diffusers' own control pipeline, given ``control_image``
            from simpletuner.models.flux_control import validation_pipeline_class

            return validation_pipeline_class()(**self._components(denoiser))
        pipeline = FluxValidationPipeline(**self._components(denoiser))
        pipeline.family = self
        return pipeline

    def validation_defaults(self) -> dict[str, Any]:
        """Unless set: the embedded guidance FLUX.1 [dev] LoRAs are sampled with, and no negative
        prompt (it only matters with real CFG, where "blurry, cropped, ugly" is rarely wanted)."""
        return {"validation_guidance": DEFAULT_VALIDATION_GUIDANCE, "validation_negative_prompt": ""}

    def pipeline_call_arguments(self) -> dict[str, Any]:
        real = self.config.validation_guidance_real
        return {} if real is None else {"true_cfg_scale": float(real)}

    def validation_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`encode_prompts` for validation, each distinct prompt encoded once per run while the
        text encoders stay frozen; with ``--train_text_encoder`` every validation encodes afresh, so
        the images show the encoder as trained so far."""
        if self.config.train_text_encoder:
            self._validation_prompts.clear()
        missing = [p for p in dict.fromkeys(prompts) if p not in self._validation_prompts]
        if missing:
            encoded = self.encode_prompts(missing)
            for index, prompt in enumerate(missing):
                self._validation_prompts[prompt] = {k: v[index:index + 1] for k, v in encoded.items()}
        return {key: torch.cat([self._validation_prompts[p][key] for p in prompts])
                for key in ("prompt_embeds", "pooled_prompt_embeds", "attention_mask")}

    def lora_target_modules(self) -> list[str]:
        preset = self.config.flux_lora_target or "mmdit"
        return lora_target_preset(preset, len(self.transformer.single_transformer_blocks))

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """``FluxPipeline.save_lora_weights``: ``transformer.*`` and, with ``--train_text_encoder``,
        CLIP-L's ``text_encoder.*`` keys, the layout ``FluxPipeline.load_lora_weights`` reads."""
        # add_lora records dropout 0 in the config, so images made after load_lora_weights are deterministic
        clip_state = (text_encoder_states or {}).get("text_encoder")
        if not clip_state:
            return save_transformer_lora(self, FluxPipeline, folder, lora_state, metadata, text_encoder_states)
        from simpletuner.models.sdxl import inference_lora_config

        FluxPipeline.save_lora_weights(
            folder, transformer_lora_layers=lora_state, safe_serialization=True,
            transformer_lora_adapter_metadata=metadata.get("lora_config"), text_encoder_lora_layers=clip_state,
            text_encoder_lora_adapter_metadata=inference_lora_config(metadata.get("text_encoder_lora_config")))
        return folder / "pytorch_lora_weights.safetensors"

    def controlnet_image_argument(self) -> str:
        return "control_image"  # FluxControlPipeline's name for it (--control)

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        """A ``FluxPipeline`` folder, or with ``--control`` a ``FluxControlPipeline`` one."""
        if self.config.control:
            from diffusers import FluxControlPipeline

            FluxControlPipeline(**self._components(denoiser)).save_pretrained(folder, safe_serialization=True)
            return folder
        FluxPipeline(**self._components(denoiser)).save_pretrained(folder, safe_serialization=True)
        return folder


# --- the validation pipeline --------------------------------------------------------------------------


@dataclass
class _EncodedText:
    embeds: torch.Tensor
    mask: torch.Tensor


class FluxValidationPipeline(FluxPipeline):
    """``FluxPipeline`` that encodes prompts like training and applies the family's validation
    options. Only validation uses it; saved pipelines are plain ``FluxPipeline`` folders."""

    family: Flux | None = None
    #: The texts encoded during the current call, the prompt's first (set by ``__call__``).
    _encoded: list[_EncodedText] | None = None

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length: int = 512, lora_scale=None):
        if prompt is None or prompt_2 is not None or prompt_embeds is not None or self.family is None:
            return super().encode_prompt(prompt, prompt_2, device, num_images_per_prompt, prompt_embeds,
                                         pooled_prompt_embeds, max_sequence_length, lora_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text = self.family.validation_text(prompts)
        embeds, pooled, mask = (text[key].repeat_interleave(num_images_per_prompt, dim=0)
                                for key in ("prompt_embeds", "pooled_prompt_embeds", "attention_mask"))
        device = device or self._execution_device
        embeds, pooled = embeds.to(device), pooled.to(device)
        if self._encoded is not None:
            self._encoded.append(_EncodedText(embeds, mask.to(device)))
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)
        return embeds, pooled, text_ids

    def __call__(self, *args, **kwargs):
        """Real CFG without a negative prompt compares against the empty prompt (the unconditional
        prediction caption dropout trained); the transformer is routed through :meth:`_routed`."""
        if kwargs.get("true_cfg_scale", 1.0) > 1 and kwargs.get("negative_prompt") is None \
                and kwargs.get("negative_prompt_embeds") is None:
            prompt = kwargs.get("prompt", args[0] if args else None)
            kwargs["negative_prompt"] = "" if isinstance(prompt, str) else [""] * len(prompt)
        self._encoded = []
        no_cfg_steps = int(self.family.config.validation_no_cfg_until_timestep or 0) \
            if self.family is not None else 0
        with self._routed(no_cfg_steps):
            return super().__call__(*args, **kwargs)

    @contextmanager
    def _routed(self, no_cfg_steps: int):
        """Wrap the transformer's forward for one call of the pipeline.

        The pipeline calls the transformer once per step with the prompt's embeds and, with real CFG,
        once more with the negative prompt's. The wrapper adds the T5 attention mask of whichever
        text it is given (masked training), and for the first ``no_cfg_steps`` steps answers the
        negative call with the prompt's own prediction: ``neg + s * (pos - neg)`` is then exactly
        ``pos``, i.e. no CFG, and the negative pass is not computed.
        """
        transformer = self.transformer
        original = transformer.forward
        own_forward = "forward" in transformer.__dict__  # e.g. an offloading hook's
        masked = self.family is not None and self.family.masked_training
        state = {"steps": 0, "last": None}

        def forward(*args, **kwargs):
            embeds = kwargs.get("encoder_hidden_states")
            entry = next((e for e in self._encoded if e.embeds is embeds), None)
            negative = len(self._encoded) > 1 and entry is self._encoded[1]
            if negative and state["steps"] <= no_cfg_steps and state["last"] is not None:
                return (state["last"],)
            if masked and entry is not None:
                image_tokens = kwargs["hidden_states"].shape[1]
                kwargs["joint_attention_kwargs"] = {**(kwargs.get("joint_attention_kwargs") or {}),
                                                    "attention_mask": joint_attention_mask(entry.mask, image_tokens)}
            output = original(*args, **kwargs)
            if not negative:
                state["steps"] += 1
                state["last"] = output[0] if isinstance(output, tuple) else output.sample
            return output

        transformer.forward = forward
        try:
            yield
        finally:
            if own_forward:
                transformer.forward = original
            else:
                del transformer.forward
            self._encoded = None
