"""Kolors: Kuaishou's SDXL-shaped UNet conditioned on the ChatGLM3-6B language model.

Everything but the text side is SDXL's (:class:`~simpletuner.models.sdxl.StableDiffusionXL`: the
``text_time`` micro-conditioning from each image's sizes, the SD 4-channel VAE latent space, the
epsilon objective, LoRA on the UNet's attention projections). The text side, as
``KolorsPipeline.encode_prompt`` builds it:

* ChatGLM3 reads the prompt left-padded to ``--tokenizer_max_length`` tokens (256 by default, the
  pipeline's own length) behind its ``[gMASK]`` and ``sop`` prefix;
* ``prompt_embeds`` are the penultimate layer's hidden states, which the UNet projects from the
  ChatGLM width (4096) to its cross-attention width (2048) itself (``encoder_hid_dim_type="text_proj"``);
* ``pooled_prompt_embeds`` are the last layer's hidden state at the final position (the last token).

Kolors' pipeline does not zero the empty negative prompt, so caption dropout trains with the encoded
empty prompt. The checkpoint's scheduler has 1100 training timesteps; training draws from all of them.
ChatGLM is not trained here (``--train_text_encoder`` is refused for Kolors): at 6B parameters it
would dwarf the UNet, and Kolors' published fine-tunes keep it frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.sdxl import StableDiffusionXL, inference_lora_config

logger = logging.getLogger(__name__)

#: ChatGLM tokens per prompt when ``--tokenizer_max_length`` is unset (``KolorsPipeline``'s default).
DEFAULT_CHATGLM_TOKENS = 256


class Kolors(StableDiffusionXL):
    family = "kolors"

    @property
    def max_tokens(self) -> int:
        return int(self.config.tokenizer_max_length or DEFAULT_CHATGLM_TOKENS)

    # --- loading -----------------------------------------------------------------------------------

    def _load_single_file(self) -> None:
        raise RuntimeError(f"{self.model_path}: diffusers cannot load Kolors from a single file; point "
                           "--pretrained_model_name_or_path at a diffusers folder or hub id (Kwai-Kolors/Kolors-diffusers)")

    def load_text_encoders(self, path: str) -> None:
        """ChatGLM3 and its SentencePiece tokenizer (the classes ship inside diffusers)."""
        from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

        source = dict(revision=self.config.revision)
        self.tokenizer = ChatGLMTokenizer.from_pretrained(path, subfolder="tokenizer", **source)
        self.text_encoder = self.load_text_encoder("text_encoder", ChatGLMModel, path, subfolder="text_encoder",
                                                   variant=self.config.variant, **source)
        self.tokenizer_2 = self.text_encoder_2 = None

    def pooled_width(self) -> int:
        return self.text_encoder.config.hidden_size

    def fingerprint_parts(self) -> dict[str, str]:
        """The ChatGLM length changes every cached prompt embedding."""
        return {**super().fingerprint_parts(), "chatglm_tokens": str(self.max_tokens)}

    # --- conditioning --------------------------------------------------------------------------------

    def text_conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt").to(self.device)
        output = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                   position_ids=tokens["position_ids"], output_hidden_states=True)
        # ChatGLM's hidden states are sequence-first: [tokens, batch, width]
        return {"prompt_embeds": output.hidden_states[-2].permute(1, 0, 2).contiguous(),
                "pooled_prompt_embeds": output.hidden_states[-1][-1].clone()}

    def trainable_text_encoders(self) -> dict[str, torch.nn.Module]:
        return {}

    # --- validation and outputs ------------------------------------------------------------------------

    def _pipeline(self, denoiser: torch.nn.Module | None, scheduler, validation: bool = False):
        from diffusers import KolorsPipeline

        return KolorsPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                              unet=denoiser if denoiser is not None else self.denoiser, scheduler=scheduler,
                              force_zeros_for_empty_prompt=self.force_zeros)

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Validation encodes prompts at the ChatGLM length training used."""
        return {"max_sequence_length": self.max_tokens}

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """``KolorsPipeline.save_lora_weights``: ``unet.*`` keys that ``load_lora_weights`` reads back."""
        from diffusers import KolorsPipeline

        KolorsPipeline.save_lora_weights(folder, unet_lora_layers=lora_state, safe_serialization=True,
                                         unet_lora_adapter_metadata=inference_lora_config(metadata.get("lora_config")))
        return folder / "pytorch_lora_weights.safetensors"
