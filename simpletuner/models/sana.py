"""Sana (and SANA 1.5): a linear-attention DiT (``SanaTransformer2DModel``) over a deep-compression
autoencoder, conditioned on a Gemma 2 text encoder, trained with rectified flow.

* **Text.** Gemma's last hidden states (:mod:`simpletuner.models.gemma`) for ``--tokenizer_max_length``
  tokens (300 by default, as the pipeline) plus their attention mask, which keeps padded tokens out
  of the transformer's cross-attention. Captions are lower-cased and stripped first, as
  ``SanaPipeline`` does. Sana was trained with a *complex human instruction* in front of every caption
  (a few lines asking Gemma to enrich the prompt); the pipeline prepends it at inference, so training
  prepends the same text (``--sana_complex_human_instruction``: unset means the pipeline's own
  instruction, ``[]`` none, a list of lines, a string, or a ``.json`` / ``.txt`` file). As in the
  pipeline, Gemma then reads ``instruction tokens + length - 2`` tokens and the transformer gets the
  first token and the last ``length - 1`` (the caption's), so the instruction shapes the caption's
  hidden states without taking up text tokens. The empty prompt (caption dropout, the negative prompt)
  is encoded without the instruction, as the pipeline encodes its negative prompt.
* **Latents.** ``AutoencoderDC`` compresses 32x per side into 32 channels, deterministically (no
  posterior to sample): the cache holds its latent, with a zero spread, and training scales it by the
  VAE's ``scaling_factor``.
* **Objective.** Flow matching (``x_s = (1 - s) x0 + s eps``, target ``eps - x0``): the shipped
  scheduler's ``flow_prediction``. The model gets ``1000 s`` times the transformer's ``timestep_scale``,
  as the pipeline feeds it; the default shift is the shipped scheduler's ``flow_shift`` (3.0 for the
  released checkpoints).
* **LoRA.** Attention projections of the self- (linear) and cross-attention of every block, written by
  ``SanaPipeline.save_lora_weights`` (``transformer.<module path>.lora_A/lora_B.weight``) so
  ``SanaPipeline.load_lora_weights`` reads it. ComfyUI has no key map for Sana:
  ``--lora_format comfyui`` is refused for this family.
* **Validation.** ``SanaPipeline`` at exactly the requested size (no resolution binning), with the
  caption length and instruction used in training, and the empty prompt as the negative one unless set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SanaPipeline

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import OneTransformerFamily, load_transformer, load_vae
from simpletuner.models.gemma import encode_with_gemma, gemma_source, load_gemma

logger = logging.getLogger(__name__)

#: Caption tokens when ``--tokenizer_max_length`` is unset: the pipeline's ``max_sequence_length``.
DEFAULT_MAX_TOKENS = 300
#: The default shift when the shipped scheduler names none (the released checkpoints use 3.0).
DEFAULT_FLOW_SHIFT = 3.0
#: Self-attention (linear) and cross-attention projections of every block: the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# --- the complex human instruction ------------------------------------------------------------------


def pipeline_instruction() -> list[str]:
    """The instruction lines ``SanaPipeline.__call__`` prepends by default, read from diffusers itself so
    training and inference cannot drift apart when diffusers changes them."""
    import inspect

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def instruction_lines(config) -> list[str]:
    """``--sana_complex_human_instruction`` as the list of lines the pipeline takes (empty: none).

    Unset: the pipeline's own instruction. A list: its lines. A string: a ``.json`` file holding a list
    or a string, any other existing file read line by line, or else the instruction text itself.
    """
    from simpletuner.options import ConfigError

    value = config.sana_complex_human_instruction
    option = "`--sana_complex_human_instruction`"
    if value is None:
        return pipeline_instruction()
    if isinstance(value, str):
        path = Path(value).expanduser()
        if path.suffix.lower() in (".json", ".txt") and not path.is_file():
            raise ConfigError(f"{option} = {value}: no such file; give an existing .json / .txt file, the "
                              "instruction text itself, or [] for none")
        if path.suffix.lower() == ".json":
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{option}: {path} is not valid JSON ({error}); it must hold a list of lines "
                                  "or one string") from None
            if isinstance(value, str):
                value = [value]
        elif path.suffix.lower() == ".txt":
            value = path.read_text(encoding="utf-8").splitlines()
        else:
            value = [value] if value.strip() else []
    if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
        raise ConfigError(f"{option} must be a list of strings (the instruction's lines), a string or a file; got "
                          f"{type(value).__name__}")
    return list(value)


@dataclass(frozen=True)
class SanaTextSettings:
    """How captions become text tokens: their length and the instruction in front of them."""

    max_tokens: int
    instruction: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> "SanaTextSettings":
        return cls(max_tokens=int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS),
                   instruction=tuple(instruction_lines(config)))

    @property
    def instruction_text(self) -> str:
        """The lines joined as the pipeline joins them (empty: no instruction)."""
        return "\n".join(self.instruction)


# --- the family -------------------------------------------------------------------------------------


class Sana(OneTransformerFamily, ModelFamily):
    family = "sana"
    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_ATTENTION_TARGETS
    #: Replaced in :meth:`load` by the shipped scheduler's ``flow_shift``.
    default_flow_shift = DEFAULT_FLOW_SHIFT
    flow_patch_size = 1

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_settings = SanaTextSettings.from_config(config)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderDC, SanaTransformer2DModel

        self.transformer = load_transformer(self, SanaTransformer2DModel, "Sana")
        self.tokenizer, self.text_encoder = load_gemma(self)
        self.vae = load_vae(self, AutoencoderDC)
        self._load_schedulers()
        for module in (self.text_encoder, self.vae, self.transformer):
            self.place(module)  # each was loaded in its dtype already
        self.denoiser = self.transformer
        self.flow_patch_size = int(self.transformer.config.patch_size)
        self.freeze_encoders()
        logger.info("sana text: %d Gemma tokens, complex human instruction %s; default flow shift %.2f",
                    self.text_settings.max_tokens,
                    f"of {len(self.text_settings.instruction)} lines" if self.text_settings.instruction else "off",
                    self.default_flow_shift)

    def _load_schedulers(self) -> None:
        """Training: flow matching with the shipped scheduler's shift. Validation: the shipped scheduler
        (DPM-Solver++ with flow sigmas for the released checkpoints)."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        shipped = FlowMatchEulerDiscreteScheduler.load_config(self.config_source, subfolder="scheduler",
                                                              **self.base_source(weights=False))
        self._shipped_scheduler_config = dict(shipped)
        self._inference_scheduler_class = getattr(diffusers, shipped.get("_class_name", ""), None) or \
            diffusers.DPMSolverMultistepScheduler
        shift = shipped.get("flow_shift") or shipped.get("shift") or DEFAULT_FLOW_SHIFT
        self.default_flow_shift = float(shift)
        self._scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(shipped.get("num_train_timesteps", 1000)), shift=self.default_flow_shift)

    def vae_scale_factor(self) -> int:
        """AutoencoderDC halves the size once per encoder stage after the first (32 for Sana's)."""
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def fingerprint_parts(self) -> dict[str, str]:
        """The Gemma source, the caption length and the instruction change every cached embedding."""
        import hashlib

        instruction = hashlib.sha256(self.text_settings.instruction_text.encode("utf-8")).hexdigest()[:16]
        return {**super().fingerprint_parts(), "gemma": gemma_source(self),
                "max_tokens": str(self.text_settings.max_tokens), "instruction": instruction}

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Gemma's hidden states and mask for ``max_tokens`` caption tokens, as ``SanaPipeline.encode_prompt``
        makes them: the instruction in front of non-empty prompts, the empty prompt without it."""
        texts = [prompt.lower().strip() for prompt in prompts]
        embeds: list[torch.Tensor | None] = [None] * len(texts)
        masks: list[torch.Tensor | None] = [None] * len(texts)
        instructed = [index for index, text in enumerate(texts) if text and self.text_settings.instruction]
        plain = [index for index in range(len(texts)) if index not in instructed]
        for indices, with_instruction in ((instructed, True), (plain, False)):
            if indices:
                encoded, mask = self._encode([texts[i] for i in indices], with_instruction)
                for row, index in enumerate(indices):
                    embeds[index], masks[index] = encoded[row], mask[row]
        return {"prompt_embeds": torch.stack(embeds), "prompt_attention_mask": torch.stack(masks)}

    def _encode(self, texts: list[str], with_instruction: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's selection: read the instruction and the caption together, keep the first token
        and the caption's last ``max_tokens - 1`` positions."""
        length = self.text_settings.max_tokens
        read = length
        if with_instruction:
            instruction = self.text_settings.instruction_text
            texts = [instruction + text for text in texts]
            read = len(self.tokenizer.encode(instruction)) + length - 2
        text = encode_with_gemma(self.tokenizer, self.text_encoder, texts, read, self.device)
        keep = [0, *range(text.embeds.shape[1] - length + 1, text.embeds.shape[1])]
        return text.embeds[:, keep], text.mask[:, keep]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """AutoencoderDC's latent (it is deterministic: the spread is zero, so every epoch sees the same)."""
        latent = self.vae.encode(pixels.to(self.device, dtype=self.vae.dtype)).latent.float()
        return {"latent_mean": latent, "latent_std": torch.zeros(latent.shape[0], 1, 1, 1)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        # the mask arrives cast to the weight dtype with the other text tensors; make it exact 0/1
        mask = (text["prompt_attention_mask"] > 0.5).to(noisy_latents.dtype)
        timestep = timesteps * float(self.denoiser.config.timestep_scale)
        output = self.denoiser(noisy_latents, encoder_hidden_states=text["prompt_embeds"],
                               encoder_attention_mask=mask, timestep=timestep, return_dict=False)[0]
        channels = noisy_latents.shape[1]
        return output[:, :channels] if output.shape[1] == 2 * channels else output  # a learned-sigma variant

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th transformer block (default: all) in the backward pass."""
        return checkpoint_every_nth_block(self.denoiser, list(self.denoiser.transformer_blocks), interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _components(self, denoiser: torch.nn.Module | None = None) -> dict[str, Any]:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                    transformer=denoiser if denoiser is not None else self.denoiser,
                    scheduler=self._inference_scheduler_class.from_config(self._shipped_scheduler_config))

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        return SanaValidationPipeline(**self._components(denoiser))

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Sample at exactly the requested size (binning would snap small sizes up to the aspect table),
        with the caption length and instruction training used, captions not cleaned (training did not)."""
        return {"use_resolution_binning": False, "max_sequence_length": self.text_settings.max_tokens,
                "complex_human_instruction": list(self.text_settings.instruction), "clean_caption": False}

    def validation_defaults(self) -> dict[str, Any]:
        """No negative prompt unless set: the pipeline's negative is the empty prompt, which caption
        dropout trains."""
        return {"validation_negative_prompt": ""}

    def lora_writer_class(self):
        return SanaPipeline

    def saved_pipeline(self, denoiser: torch.nn.Module):
        """The stock ``SanaPipeline``, not the validation subclass."""
        return SanaPipeline(**self._components(denoiser))



class SanaValidationPipeline(SanaPipeline):
    """``SanaPipeline`` that reads a missing negative prompt as the empty one (its own default): the
    validation runner passes None when no negative prompt is set, which the stock pipeline cannot
    lower-case. Only validation uses it; saved pipelines are plain ``SanaPipeline`` folders."""

    def __call__(self, *args, **kwargs):
        if kwargs.get("negative_prompt") is None and kwargs.get("negative_prompt_embeds") is None:
            kwargs["negative_prompt"] = ""
        return super().__call__(*args, **kwargs)
