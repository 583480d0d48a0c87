"""Cosmos-Predict2 text-to-image (NVIDIA, 2B and 14B): a DiT (``CosmosTransformer3DModel``) over Wan
VAE latents, conditioned on a T5 encoder through cross-attention.

* **Text.** T5 (the encoder of T5-11B in the releases) hidden states of ``--tokenizer_max_length``
  tokens (512 by default, the pipeline's ``max_sequence_length``), padded to that length, encoded with
  the attention mask, and the padded positions set to zero, exactly as
  ``Cosmos2TextToImagePipeline`` encodes. The transformer takes no text mask. Caption dropout trains
  with the encoded empty prompt.
* **Latents.** The Wan causal 3-D VAE (``AutoencoderKLWan``) encodes an image as a one-frame clip; its
  posterior is normalised per channel, ``(z - latents_mean) / latents_std`` (times the pipeline's
  ``sigma_data`` of 1), as the pipeline undoes before decoding. 8 pixels per latent cell; the
  transformer cuts 1x2x2 patches itself, so bucket edges are multiples of 16 pixels.
* **Objective.** The pipeline samples in EDM terms: latents ``x = x0 + sigma * eps`` with sigma from 80
  down to 0.002, the transformer fed ``c_in * x`` with ``c_in = 1 - t`` and the timestep
  ``t = sigma / (1 + sigma)``, and its output ``F`` turned into the clean estimate
  ``(1 - t) * x - t * F``. Since ``(1 - t) * x = (1 - t) x0 + t eps``, the transformer input is the
  flow-matching interpolation at ``t``, and the estimate equals ``x0`` exactly when ``F = eps - x0``:
  the transformer is a plain flow-matching velocity model in ``t``, which is how it is trained here
  (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, timestep ``t`` in [0, 1]). Euler steps in sigma
  and in ``t`` are the same DDIM update, so sampling with the pipeline matches (tests/models/
  test_cosmos2image.py checks both numerically). Without ``--flow_schedule_shift`` the sigmas are
  shifted by the ``shift`` of the checkpoint's scheduler config (1.0 in the releases: no shift).
* **Padding mask.** The released transformers set ``concat_padding_mask``: they append a padding-mask
  channel resized with torchvision inside their forward. Without torchvision they cannot run, so
  :meth:`Cosmos2Image.load` refuses such a checkpoint up front with a message naming torchvision
  (:func:`check_padding_mask_support`) rather than failing in the first training step.
* **Safety checker.** diffusers' pipeline builds NVIDIA's ``cosmos_guardrail`` checker when none is
  given (an ImportError without that package) and refuses to run with ``None``. Validation therefore
  passes :class:`PassThroughSafetyChecker`, which lets prompts and images through unchanged; saved
  pipelines record no checker (``safety_checker: [null, null]``). Load them with
  ``cosmos_guardrail`` installed to get NVIDIA's checker, or pass ``safety_checker=...`` yourself.
* **LoRA.** The default targets are the self- and cross-attention projections of every block
  (``attn1`` / ``attn2``: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``). The file is what diffusers'
  ``CosmosLoraLoaderMixin.save_lora_weights`` writes: ``transformer.<module path>.lora_A/lora_B.weight``
  with the adapter config as metadata. ``Cosmos2TextToImagePipeline`` has no ``load_lora_weights``;
  load the file with the transformer's own ``load_lora_adapter`` (:func:`load_lora` does that).
  ComfyUI has no key map from diffusers' Cosmos module names to its own, so ``--lora_format comfyui``
  is refused for this family.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import (
    LORA_WEIGHT_NAME,
    OneFrameClipLatents,
    OneTransformerFamily,
    load_t5,
    load_transformer,
    load_vae,
)

logger = logging.getLogger(__name__)

#: Caption tokens when ``--tokenizer_max_length`` is unset: the pipeline's default ``max_sequence_length``.
DEFAULT_MAX_TOKENS = 512
#: The releases' scheduler shift (none), used until the model's own scheduler is read.
RELEASED_SHIFT = 1.0
#: Self- and cross-attention projections of every block: the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class PassThroughSafetyChecker:
    """Stands in for ``cosmos_guardrail.CosmosSafetyChecker`` in pipelines built here.

    Why: ``Cosmos2TextToImagePipeline`` constructs NVIDIA's checker when given ``None`` (which needs the
    ``cosmos_guardrail`` package and its large guard models) and refuses to sample without one. This
    object answers the two questions the pipeline asks -- is the prompt safe, what frames to keep --
    with "yes" and "all of them", so validation images are exactly what the model produced. It is
    never saved: :func:`without_saved_safety_checker` keeps it out of pipeline folders.
    """

    def to(self, *args, **kwargs) -> "PassThroughSafetyChecker":
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def without_saved_safety_checker(pipeline):
    """Mark ``pipeline``'s safety checker as absent in its saved ``model_index.json``
    (``[null, null]``, as diffusers writes for an optional component that is not there), so
    ``save_pretrained`` neither warns about an unsaveable object nor records a class that does not
    exist on disk. The in-memory checker stays in place for sampling. Returns ``pipeline``."""
    pipeline.register_to_config(safety_checker=(None, None))
    return pipeline


def check_padding_mask_support(transformer_config, source: str) -> None:
    """Refuse a transformer whose forward needs torchvision when torchvision cannot be imported.

    ``concat_padding_mask`` (set in the released checkpoints) makes ``CosmosTransformer3DModel.forward``
    resize the padding mask with ``torchvision.transforms``; without torchvision that is a NameError
    deep inside diffusers at the first step. Said here instead, with what to do."""
    if not transformer_config.get("concat_padding_mask", False):
        return
    from diffusers.utils import is_torchvision_available

    if not is_torchvision_available():
        raise RuntimeError(
            f"{source}: this Cosmos transformer has `concat_padding_mask: true` in its config, and its forward "
            "then resizes the padding mask with torchvision, which is not importable here; install torchvision "
            "(the build matching your torch) to train it")


def cosmos_text_settings(config) -> dict[str, Any]:
    """The text settings a run uses, with Cosmos' defaults filled in for unset options."""
    return {"max_tokens": int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS)}


class Cosmos2Image(OneFrameClipLatents, OneTransformerFamily, ModelFamily):
    family = "cosmos2image"
    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_ATTENTION_TARGETS
    #: Replaced in :meth:`load` by the checkpoint scheduler's own shift.
    default_flow_shift = RELEASED_SHIFT
    flow_patch_size = 2

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_settings = cosmos_text_settings(config)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler

        # the transformer first: one needing torchvision fails before T5's gigabytes load
        self.transformer = load_transformer(self, CosmosTransformer3DModel, "Cosmos-Predict2")
        check_padding_mask_support(self.transformer.config,
                                   self.config.pretrained_transformer_model_name_or_path or self.model_path)
        self.tokenizer, self.text_encoder = load_t5(self)
        self.vae = load_vae(self, AutoencoderKLWan)
        self.adopt_loaded_transformer(FlowMatchEulerDiscreteScheduler)
        self.default_flow_shift = float(self._scheduler.config.get("shift", RELEASED_SHIFT))
        self.freeze_encoders()
        logger.info("cosmos2image text: %d T5 tokens; default flow shift %.2f (the checkpoint scheduler's)",
                    self.text_settings["max_tokens"], self.default_flow_shift)

    def fingerprint_parts(self) -> dict[str, str]:
        """The T5 source and caption length change every cached prompt embedding."""
        return {**super().fingerprint_parts(), "t5": str(self.config.pretrained_t5_model_name_or_path or self.model_path),
                "max_tokens": str(self.text_settings["max_tokens"])}

    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: one spatial halving per entry of the VAE's ``temperal_downsample``
        (the rule the pipeline itself uses)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """T5's last hidden states with the padded positions zeroed, as the pipeline encodes."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.text_settings["max_tokens"],
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return {"prompt_embeds": embeds * mask.unsqueeze(-1).to(embeds.dtype)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """The velocity ``eps - x0`` for image latents [B, C, H, W]: the transformer sees them as
        one-frame clips and takes ``t = timesteps / 1000`` in [0, 1] (see the module docstring)."""
        output = self.denoiser(
            hidden_states=noisy_latents.unsqueeze(2), timestep=(timesteps.float() / 1000).to(noisy_latents.dtype),
            encoder_hidden_states=text["prompt_embeds"], return_dict=False,
        )[0]
        return output[:, :, 0]

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th transformer block (default: all) in the backward pass."""
        return checkpoint_every_nth_block(self.denoiser, list(self.denoiser.transformer_blocks), interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def _pipeline(self, denoiser: torch.nn.Module | None = None):
        """``Cosmos2TextToImagePipeline`` around ``denoiser`` with :class:`PassThroughSafetyChecker`."""
        from diffusers import Cosmos2TextToImagePipeline

        pipeline = Cosmos2TextToImagePipeline(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
            transformer=denoiser if denoiser is not None else self.denoiser,
            scheduler=self._scheduler.__class__.from_config(self._scheduler.config),
            safety_checker=PassThroughSafetyChecker())
        return without_saved_safety_checker(pipeline)

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        return self._pipeline(denoiser)

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Validation reads captions at the training length."""
        return {"max_sequence_length": self.text_settings["max_tokens"]}

    def lora_writer_class(self):
        from diffusers.loaders import CosmosLoraLoaderMixin

        return CosmosLoraLoaderMixin


def load_lora(pipeline, path: str | Path, adapter_name: str = "default") -> torch.nn.Module:
    """Load a LoRA saved by simpletuner's ``cosmos2image`` family into ``pipeline.transformer``.

    ``Cosmos2TextToImagePipeline`` has no ``load_lora_weights``; its transformer's own
    ``load_lora_adapter`` reads the file, and this is a shorthand for that call::

        from diffusers import Cosmos2TextToImagePipeline
        from simpletuner.models.cosmos2image import load_lora

        pipeline = Cosmos2TextToImagePipeline.from_pretrained("nvidia/Cosmos-Predict2-2B-Text2Image")
        load_lora(pipeline, "output/pytorch_lora_weights.safetensors")  # or the output folder
        # the same: pipeline.transformer.load_lora_adapter("output", prefix="transformer",
        #                                                  weight_name="pytorch_lora_weights.safetensors")

    ``path`` is the ``.safetensors`` file or the folder holding ``pytorch_lora_weights.safetensors``.
    Returns the adapted transformer (changed in place).
    """
    file = Path(path)
    if file.is_dir():
        file = file / LORA_WEIGHT_NAME
    transformer = pipeline.transformer
    transformer.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="transformer",
                                  adapter_name=adapter_name)
    return transformer
