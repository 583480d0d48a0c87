"""PixArt-Sigma: a DiT (``PixArtTransformer2DModel``) conditioned on one T5 encoder only.

* **Text.** T5 v1.1 hidden states of ``--tokenizer_max_length`` tokens (300 by default, the length
  PixArt-Sigma was trained with) plus their attention mask; the transformer masks the padded tokens
  out of cross-attention. ``--t5_padding zero`` additionally zeroes the padded positions of the
  cached embeddings (``unmodified``, the default, keeps what T5 produced, as the pipeline does).
  Caption dropout trains with the encoded empty prompt, which is also the pipeline's negative prompt.
* **Latents.** The SD-style 4-channel VAE posterior, scaled by the VAE's ``scaling_factor``.
* **Objective.** DDPM epsilon prediction on the checkpoint's own beta schedule. The transformer
  outputs twice the latent channels (noise and a learned variance); :meth:`PixArtSigma.predict`
  returns the noise half only, which is what the shared loss and the pipeline use. The variance half
  is not trained here.
* **LoRA.** diffusers has no PEFT mixin on PixArt's transformer and no LoRA loader on its pipeline,
  so adapters are injected with PEFT directly (:func:`simpletuner.models.adapters.add_lora`) and
  :func:`load_lora` is the documented way to load a saved file into a ``PixArtSigmaPipeline``.

Saved LoRA layout (``pytorch_lora_weights.safetensors``): diffusers' PEFT naming,
``transformer.<module path>.lora_A.weight`` / ``.lora_B.weight`` (e.g.
``transformer.transformer_blocks.0.attn2.to_q.lora_A.weight``), with the adapter config as JSON under
the ``lora_adapter_metadata`` metadata key (``{"transformer.r": 16, "transformer.lora_alpha": 16, ...}``),
the same layout diffusers writes for the transformer families it does support. ComfyUI maps these
names for PixArt too; ``--lora_format comfyui`` writes them with ``.alpha`` tensors, which ComfyUI
needs when alpha differs from the rank. :func:`load_lora` reads both.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import component_source, load_t5
from simpletuner.objectives.targets import configure_training_scheduler, inference_scheduler_overrides

logger = logging.getLogger(__name__)

#: Caption tokens when ``--tokenizer_max_length`` is unset: PixArt-Sigma's training length.
DEFAULT_MAX_TOKENS = 300
#: Self- and cross-attention projections of every transformer block: the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: The safetensors metadata key diffusers uses for the adapter config (its LORA_ADAPTER_METADATA_KEY).
LORA_METADATA_KEY = "lora_adapter_metadata"
LORA_PREFIX = "transformer"


def pixart_text_settings(config) -> dict[str, Any]:
    """The text settings a run uses, with PixArt's defaults filled in for unset options."""
    return {
        "max_tokens": int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS),
        "t5_padding": config.t5_padding or "unmodified",
    }


class PixArtSigma(ModelFamily):
    family = "pixart_sigma"
    denoiser_name = "transformer"

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_settings = pixart_text_settings(config)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        if self.is_single_file():
            raise RuntimeError(
                f"{self.model_path}: diffusers cannot load PixArt-Sigma from a single file; point "
                "--pretrained_model_name_or_path at a diffusers folder or hub id (use "
                "--pretrained_transformer_model_name_or_path for a transformer from elsewhere)"
            )
        self.tokenizer, self.text_encoder = self._load_text_encoder()
        self.transformer = self._load_transformer()
        self.vae = self.load_vae(self.model_path)
        self._load_schedulers()
        self.place_in_weight_dtype([self.text_encoder, self.vae, self.transformer], vae=self.vae)
        self.denoiser = self.transformer
        self.freeze_encoders()
        logger.info("pixart_sigma text: %d T5 tokens (padding %s)", self.text_settings["max_tokens"],
                    self.text_settings["t5_padding"])

    def _load_text_encoder(self):
        """T5 tokenizer and encoder from the base model, or from ``--pretrained_t5_model_name_or_path``
        (a pipeline folder with ``tokenizer``/``text_encoder`` subfolders, or a plain T5 folder)."""
        from transformers import T5Tokenizer

        return load_t5(self, tokenizer_class=T5Tokenizer)

    def _load_transformer(self):
        """The DiT from the base model, or ``--pretrained_transformer_model_name_or_path`` /
        ``--pretrained_transformer_subfolder`` (e.g. a fine-tune that ships only its transformer;
        subfolder ``none`` means the weights sit at the root of the source)."""
        from diffusers import PixArtTransformer2DModel

        override = self.config.pretrained_transformer_model_name_or_path
        subfolder = self.config.pretrained_transformer_subfolder
        if subfolder is not None and subfolder.lower() in ("", "none"):
            subfolder = ""  # explicitly the root of the source
        if override:
            path, folder = (override, subfolder) if subfolder is not None else component_source(override, "transformer")
            return self.load_denoiser(PixArtTransformer2DModel, path, subfolder=folder or None)
        folder = "transformer" if subfolder is None else subfolder
        return self.load_denoiser(PixArtTransformer2DModel, self.model_path, subfolder=folder or None,
                                  **self.base_source())

    def _load_schedulers(self) -> None:
        """Training: DDPM on the checkpoint's beta schedule. Validation: the scheduler class the
        checkpoint ships (DPM-Solver++ for the released models) with the trained prediction type."""
        import diffusers
        from diffusers import DDPMScheduler

        shipped = DDPMScheduler.load_config(self.model_path, subfolder="scheduler", **self.base_source(weights=False))
        self._inference_scheduler_class = getattr(diffusers, shipped.get("_class_name", ""), None) or \
            diffusers.DPMSolverMultistepScheduler
        self._shipped_scheduler_config = dict(shipped)
        scheduler = DDPMScheduler.from_config(shipped, prediction_type=self.prediction_type)
        self._scheduler = configure_training_scheduler(scheduler, self.config)  # spacing, zero terminal SNR

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.vae]

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th transformer block (default: all) in the backward pass."""
        return checkpoint_every_nth_block(self.denoiser, list(self.denoiser.transformer_blocks), interval)

    def noise_scheduler(self):
        return self._scheduler

    def fingerprint_parts(self) -> dict[str, str]:
        """The T5 source, length and padding change every cached prompt embedding."""
        return {**super().fingerprint_parts(), "t5": str(self.config.pretrained_t5_model_name_or_path or self.model_path),
                "max_tokens": str(self.text_settings["max_tokens"]), "t5_padding": self.text_settings["t5_padding"]}

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.text_settings["max_tokens"],
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        if self.text_settings["t5_padding"] == "zero":
            embeds = embeds * mask.to(embeds.dtype).unsqueeze(-1)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """The noise prediction: the first half of the output channels (the second half is the
        learned variance, which the pipeline discards too)."""
        # the mask arrives cast to the weight dtype with the other text tensors; make it exact 0/1
        mask = (text["prompt_attention_mask"] > 0.5).to(noisy_latents.dtype)
        output = self.denoiser(
            noisy_latents, encoder_hidden_states=text["prompt_embeds"], encoder_attention_mask=mask,
            timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]
        channels = noisy_latents.shape[1]
        return output[:, :channels] if output.shape[1] == 2 * channels else output

    # --- validation and outputs ------------------------------------------------------------------------

    def _inference_scheduler(self):
        """The shipped scheduler class with the training scheduler's prediction type and schedule
        options, and ``--inference_scheduler_timestep_spacing``."""
        trained = {key: self._scheduler.config[key] for key in ("prediction_type", "timestep_spacing",
                                                                "rescale_betas_zero_snr")
                   if key in self._scheduler.config}
        return self._inference_scheduler_class.from_config(
            self._shipped_scheduler_config, **{**trained, **inference_scheduler_overrides(self.config)})

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        from diffusers import PixArtSigmaPipeline

        return PixArtSigmaPipeline(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
            transformer=denoiser if denoiser is not None else self.denoiser, scheduler=self._inference_scheduler(),
        )

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Sample at exactly the requested size (binning would snap 64 px up to the model's aspect
        table), with the caption length used in training and captions as written (cleaning needs
        extra packages and training did not clean them either)."""
        return {"use_resolution_binning": False, "max_sequence_length": self.text_settings["max_tokens"],
                "clean_caption": False}

    def lora_target_modules(self) -> list[str]:
        return list(TRANSFORMER_ATTENTION_TARGETS)

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        if text_encoder_states:
            raise ValueError("pixart_sigma does not train its text encoder; there is no text encoder LoRA to save")
        return write_lora_file(Path(folder) / LORA_WEIGHT_NAME, lora_state, metadata.get("lora_config"))

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        self.build_pipeline(denoiser).save_pretrained(folder, safe_serialization=True)
        return folder


# --- the PixArt LoRA file: written by training, read by load_lora ------------------------------------


def write_lora_file(file: Path, lora_state: dict[str, torch.Tensor], lora_config: dict[str, Any] | None) -> Path:
    """Adapter weights under ``transformer.<module path>`` with the adapter config in the metadata."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{LORA_PREFIX}.{key}": value.contiguous() for key, value in lora_state.items()}
    metadata = {"format": "pt"}
    if lora_config:
        packed = {f"{LORA_PREFIX}.{key}": (sorted(value) if isinstance(value, set) else value)
                  for key, value in lora_config.items()}
        metadata[LORA_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    save_file(tensors, str(file), metadata=metadata)
    return file


def _lora_file(path: str | Path) -> Path:
    file = Path(path)
    return file / LORA_WEIGHT_NAME if file.is_dir() else file


def lora_config_for(state: dict[str, torch.Tensor], alphas: dict[str, float]):
    """A PEFT ``LoraConfig`` that recreates exactly the adapted modules of ``state`` (PEFT layout).

    The targets are the full module paths found in the file, so nothing else gets an adapter; each
    module's rank comes from its ``lora_A`` shape and its alpha from the file (metadata or ``.alpha``
    tensors), equal to the rank when the file has none. DoRA files bring their magnitude vectors.
    """
    import re
    from collections import Counter

    from peft import LoraConfig

    ranks = {key[: -len(".lora_A.weight")]: int(value.shape[0]) for key, value in state.items()
             if key.endswith(".lora_A.weight")}
    if not ranks:
        raise ValueError("the LoRA file holds no `lora_A` weights for the transformer")
    module_alphas = {path: float(alphas.get(path, rank)) for path, rank in ranks.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(module_alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,  # inference
        target_modules=sorted(ranks),
        rank_pattern={re.escape(path): r for path, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(path): a for path, a in module_alphas.items() if a != alpha},
        use_dora=any(".lora_magnitude_vector" in key for key in state),
    )


def load_lora(pipeline, path: str | Path, adapter_name: str = "default") -> torch.nn.Module:
    """Load a LoRA saved by simpletuner's ``pixart_sigma`` family into ``pipeline.transformer``.

    diffusers' ``PixArtSigmaPipeline`` has no ``load_lora_weights``; this is its replacement::

        from diffusers import PixArtSigmaPipeline
        from simpletuner.models.pixart_sigma import load_lora

        pipeline = PixArtSigmaPipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
        load_lora(pipeline, "output/pytorch_lora_weights.safetensors")  # or the output folder

    ``path`` is the ``.safetensors`` file or the folder holding ``pytorch_lora_weights.safetensors``,
    in either ``--lora_format`` (``transformer.<module path>.lora_A/lora_B.weight``, with the alpha in
    the metadata or in ``.alpha`` tensors). Returns the adapted transformer (changed in place).
    """
    from peft import inject_adapter_in_model

    from simpletuner.models import lora_formats as formats

    file = _lora_file(path)
    transformer = pipeline.transformer
    lora_file = formats.LoraFile.read(file)
    states, alphas, _ = formats.peft_state_from_file(lora_file, {LORA_PREFIX: transformer},
                                                     formats.COMFYUI_NAMING.get(PixArtSigma.family))
    state = states.get(LORA_PREFIX)
    if not state:
        raise ValueError(f"{file}: no `{LORA_PREFIX}.*` adapter weights; is this a PixArt LoRA?")
    module_alphas = alphas.get(LORA_PREFIX, {})
    inject_adapter_in_model(lora_config_for(state, module_alphas), transformer, adapter_name=adapter_name)
    formats.load_peft_state(transformer, state, module_alphas, source=str(file), adapter_name=adapter_name)
    transformer.eval()
    return transformer
