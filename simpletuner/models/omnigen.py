"""OmniGen (v1): one Phi-3-style transformer that reads the prompt tokens and the image patches together.

* **Text.** There is no text encoder. The transformer embeds the prompt's token ids itself
  (``embed_tokens``, trained with the rest of it), so "encoding" a caption is tokenization: the caption
  goes into OmniGen's chat template (``<|user|>`` + instruction + caption + ``<|end|>`` +
  ``<|assistant|>`` + ``<|diffusion|>``), exactly as diffusers' ``OmniGenMultiModalProcessor`` writes
  it, and is cut to ``--tokenizer_max_length`` tokens (512 by default, the template's closing tokens
  always kept). The cache stores the token ids left-padded to that length and their 0/1 mask. The ids are
  stored as two base-256 digits (``token_ids_high`` / ``token_ids_low``) because the trainer casts every
  cached text tensor to the weight dtype before the model call, and bfloat16 holds whole numbers exactly
  only up to 256; digits survive that cast, ids of a 32k vocabulary would not.
* **The model call.** From the ids, the mask and the image size, :func:`joint_position_ids` and
  :func:`joint_attention_mask` build what diffusers' ``OmniGenCollator`` builds for the pipeline: the
  sequence is text, one time token, then the image patches; text and time token attend causally, image
  tokens attend to everything that is not padding, and position ids count only real tokens. Padding
  common to the whole batch is dropped first, so a batch costs what the pipeline's longest-prompt padding
  costs. (diffusers' rotary embedding reads the position ids of the batch's first row for every row, in
  the pipeline too; training calls the same transformer, so it shares that behaviour.)
* **Latents.** The SD-style 4-channel VAE posterior (SDXL's VAE in the released model), scaled by the
  VAE's ``scaling_factor``; no shift. The transformer patchifies 2x2 latent cells itself.
* **Objective.** Flow matching on OmniGen's own clock: the checkpoint's scheduler inverts the sigmas and
  counts one unit of time, so the transformer is fed ``t = 1 - s`` (0 pure noise, 1 the clean image)
  and predicts ``x0 - eps``. Training draws ``s`` like every flow family (``x_s = (1 - s) x0 + s eps``,
  target ``eps - x0``) and :meth:`OmniGen.predict` converts both ways. Without ``--flow_schedule_shift``
  the shift is the checkpoint scheduler's own (1.0 for the released model: none).
* **Validation.** diffusers' ``OmniGenPipeline`` builds its prompt processor with torchvision (for edit
  images), which this project does not install; validation uses :class:`OmniGenTextPipeline`, the same
  pipeline (its ``__call__`` is diffusers') with a text-only processor that takes a negative prompt.
  Edit prompts with ``<img><|image_1|></img>`` and input images are refused (text-to-image only).
* **LoRA.** Attention projections of every block. diffusers has no LoRA loader for OmniGen; the file
  uses diffusers' PEFT naming (``transformer.layers.0.self_attn.to_q.lora_A.weight``, config in the
  ``lora_adapter_metadata`` metadata) and :func:`load_lora` loads it into an ``OmniGenPipeline`` (or
  ours). ComfyUI has no OmniGen v1 model (only OmniGen2), so ``--lora_format comfyui`` is refused.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import OmniGenPipeline

from simpletuner.models.base import ModelFamily, checkpoint_every_nth_block
from simpletuner.models.components import (
    LORA_WEIGHT_NAME,
    OneTransformerFamily,
    is_single_file,
    load_transformer,
    load_vae,
)

logger = logging.getLogger(__name__)

#: Caption tokens (template included) when ``--tokenizer_max_length`` is unset: the option's maximum.
#: Padding costs nothing in training (padding common to a batch is dropped), so the default cuts nothing
#: a real caption needs.
DEFAULT_MAX_TOKENS = 512
#: OmniGen's chat template around a caption, as its processor writes it.
TEMPLATE_PREFIX = "<|user|>\nGenerate an image according to the following instructions\n"
TEMPLATE_SUFFIX = "<|end|>\n<|assistant|>\n<|diffusion|>"
#: Token ids are cached as two digits of this base (see the module docstring).
ID_DIGIT_BASE = 256
#: The shift of the released checkpoint's scheduler (none), used until the model's own is read.
RELEASED_SHIFT = 1.0
#: Attention projections of every block: the default LoRA target.
TRANSFORMER_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_PREFIX = "transformer"
#: Markers of an edit prompt (an input image's place in the text).
IMAGE_TAG = "<|image_"


def omnigen_text_settings(config) -> dict[str, Any]:
    """The text settings a run uses, with OmniGen's defaults filled in for unset options."""
    return {"max_tokens": int(config.tokenizer_max_length or DEFAULT_MAX_TOKENS)}


def templated(prompt: str) -> str:
    """``prompt`` inside OmniGen's chat template."""
    return f"{TEMPLATE_PREFIX}{prompt}{TEMPLATE_SUFFIX}"


def refuse_edit_prompt(prompt: str) -> None:
    """Edit prompts reference input images the trainer neither loads nor encodes yet."""
    if IMAGE_TAG in prompt:
        raise ValueError(
            f"omnigen: the prompt {prompt[:80]!r} references an input image (`<img><|image_N|></img>`); only "
            "text-to-image prompts are supported for training and validation, remove the image tags")


def refuse_reference_images(batch: dict | None) -> None:
    """A batch with paired conditioning pictures (``reference_*`` / control datasets) asks for OmniGen's
    editing, which is not trained here; ignoring the pictures would silently train text-to-image."""
    if batch and batch.get("conditioning_pixels") is not None:
        raise ValueError(
            "omnigen: a dataset is paired with conditioning images (`conditioning_data`), but only text-to-image "
            "training is supported (editing with input images is not); remove `conditioning_data` from the "
            "dataset, or keep only `mask` conditioning")


def prompt_token_ids(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """The token ids of ``prompt`` in OmniGen's template, at most ``max_tokens`` of them.

    A caption too long is cut just before the template's closing tokens (which tell the model to start
    the image): they are always kept, so a long caption loses its end rather than the template.
    """
    refuse_edit_prompt(prompt)
    ids = list(tokenizer(templated(prompt)).input_ids)
    if len(ids) <= max_tokens:
        return ids
    closing = len(tokenizer(TEMPLATE_SUFFIX, add_special_tokens=False).input_ids)
    prefix = len(tokenizer(TEMPLATE_PREFIX).input_ids)
    if max_tokens < prefix + closing + 1:
        raise ValueError(f"omnigen: --tokenizer_max_length {max_tokens} cannot hold OmniGen's prompt template "
                         f"({prefix + closing} tokens) and a caption; use at least {prefix + closing + 16}")
    return ids[: max_tokens - closing] + ids[-closing:]


def left_padded(rows: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` left-padded to ``length`` (the padding OmniGen's collator uses) and their 0/1 mask."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[index, length - len(row):] = 1
    return ids, mask


def split_ids(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids as two base-256 digits, each exact in any floating dtype the trainer casts it to (bf16
    holds whole numbers exactly up to 256), for vocabularies below 65,536 ids (OmniGen's has 32,064)."""
    if int(ids.max()) >= ID_DIGIT_BASE ** 2:
        raise ValueError(f"omnigen: token id {int(ids.max())} does not fit two base-{ID_DIGIT_BASE} digits; this "
                         "tokenizer is larger than OmniGen's")
    return {"token_ids_high": torch.div(ids, ID_DIGIT_BASE, rounding_mode="floor"),
            "token_ids_low": torch.remainder(ids, ID_DIGIT_BASE)}


def joined_ids(text: dict[str, torch.Tensor]) -> torch.Tensor:
    """The token ids back from :func:`split_ids`' digits (as integers, whatever dtype they arrive in)."""
    return text["token_ids_high"].round().long() * ID_DIGIT_BASE + text["token_ids_low"].round().long()


def without_common_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the left padding every row of the batch has: the batch then is padded to its longest
    prompt, as the pipeline pads it."""
    longest = max(int(mask.sum(dim=1).max()), 1)
    return ids[:, -longest:], mask[:, -longest:]


def joint_position_ids(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """Position ids of the sequence text + time token + image tokens: padding at 0, then every real
    token counted from 0 (what diffusers' ``OmniGenCollator.create_position`` builds)."""
    real = torch.cat([text_mask.bool(), text_mask.new_ones(text_mask.shape[0], image_tokens + 1, dtype=torch.bool)], 1)
    return (real.long().cumsum(dim=1) - 1).clamp(min=0)


def joint_attention_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """1 where a query (row) may attend to a key (column) of text + time token + image tokens.

    Text and the time token attend causally, image tokens to every real token; nothing attends to
    padding, and padding rows see everything (their outputs are discarded, a fully hidden row would
    only produce NaNs): OmniGen's attention pattern as ``OmniGenCollator.create_mask`` builds it.
    """
    batch, length = text_mask.shape
    size = length + 1 + image_tokens
    real = torch.cat([text_mask.bool(), text_mask.new_ones(batch, image_tokens + 1, dtype=torch.bool)], 1)
    query = torch.arange(size, device=text_mask.device).view(1, size, 1)
    key = torch.arange(size, device=text_mask.device).view(1, 1, size)
    causal_or_image = (key <= query) | (query > length)
    allowed = real.unsqueeze(1) & causal_or_image
    padding_rows = ~real.unsqueeze(2)
    return (allowed | padding_rows).long()


class OmniGen(OneTransformerFamily, ModelFamily):
    family = "omnigen"
    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_ATTENTION_TARGETS
    #: Replaced in :meth:`load` by the checkpoint scheduler's own shift.
    default_flow_shift = RELEASED_SHIFT
    flow_patch_size = 2
    block_list_names = ("layers",)

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(config, device, weight_dtype)
        self.text_settings = omnigen_text_settings(config)

    # --- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenTransformer2DModel
        from transformers import AutoTokenizer

        self._refuse_single_file()
        self.transformer = load_transformer(self, OmniGenTransformer2DModel, "OmniGen")
        self.tokenizer = AutoTokenizer.from_pretrained(self.config_source, subfolder="tokenizer",
                                                       **self.base_source(weights=False))
        self.vae = load_vae(self, AutoencoderKL)
        #: the checkpoint's sampler (inverted sigmas on a [0, 1] clock), for validation and saved pipelines
        self._shipped_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            self.config_source, subfolder="scheduler", **self.base_source(weights=False))
        shift = float(self._shipped_scheduler.config.get("shift", RELEASED_SHIFT))
        # training draws sigmas on the usual 0 (clean) .. 1000 (noise) clock; predict() converts
        self._scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        for module in (self.vae, self.transformer):
            self.place(module)  # each was loaded in its dtype already
        self.denoiser = self.transformer
        self.flow_patch_size = self.transformer.config.patch_size
        self.default_flow_shift = shift
        self.freeze_encoders()
        logger.info("omnigen text: up to %d tokens (template included); default flow shift %.2f",
                    self.text_settings["max_tokens"], shift)

    def _refuse_single_file(self) -> None:
        """diffusers cannot convert an original OmniGen checkpoint (its transformer has no single-file loader)."""
        override = self.config.pretrained_transformer_model_name_or_path
        for path in (self.model_path, override):
            if is_single_file(path):
                raise RuntimeError(
                    f"{path}: diffusers cannot load OmniGen from a single file; point --pretrained_model_name_or_path "
                    "(or --pretrained_transformer_model_name_or_path) at a diffusers folder or hub id")

    def fingerprint_parts(self) -> dict[str, str]:
        """The tokenizer (part of the model) and the token limit change every cached prompt."""
        return {**super().fingerprint_parts(), "max_tokens": str(self.text_settings["max_tokens"]),
                "omnigen_text": "template-ids-v1"}

    # --- conditioning and latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids of each caption in OmniGen's template, left-padded to the token limit, and their mask."""
        length = self.text_settings["max_tokens"]
        rows = [prompt_token_ids(self.tokenizer, prompt, length) for prompt in prompts]
        ids, mask = left_padded(rows, length, self._pad_id())
        return {**split_ids(ids), "attention_mask": mask}

    def _pad_id(self) -> int:
        """The id padding positions hold (never attended to): the transformer's own padding token."""
        return int(self.transformer.config.pad_token_id)

    def model_inputs(self, text: dict[str, torch.Tensor], latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` of the transformer for cached text and
        latents of this size, as the pipeline's collator builds them."""
        ids, mask = without_common_padding(joined_ids(text), text["attention_mask"] > 0.5)
        patch = self.denoiser.config.patch_size
        image_tokens = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        return {"input_ids": ids.to(latents.device),
                "attention_mask": joint_attention_mask(mask, image_tokens).to(latents.device, latents.dtype),
                "position_ids": joint_position_ids(mask, image_tokens).to(latents.device)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """The flow velocity ``eps - x0``: the transformer runs on OmniGen's clock (``t = 1 - s``) and
        predicts ``x0 - eps``, so its output is negated."""
        refuse_reference_images(batch)
        clock = 1 - timesteps.float() / 1000
        output = self.denoiser(
            hidden_states=noisy_latents, timestep=clock.to(noisy_latents.dtype), input_img_latents=[],
            input_image_sizes={}, return_dict=False, **self.model_inputs(text, noisy_latents),
        )[0]
        return -output

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute every ``interval``-th block (default: all) in the backward pass."""
        return checkpoint_every_nth_block(self.transformer, list(self.transformer.layers), interval)

    # --- validation and outputs ------------------------------------------------------------------------

    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        return OmniGenTextPipeline(
            transformer=denoiser if denoiser is not None else self.denoiser, vae=self.vae, tokenizer=self.tokenizer,
            scheduler=self._shipped_scheduler.__class__.from_config(self._shipped_scheduler.config),
            max_tokens=self.text_settings["max_tokens"])

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        from simpletuner.models.components import refuse_text_encoder_lora
        from simpletuner.models.pixart_sigma import write_lora_file

        refuse_text_encoder_lora(self, text_encoder_states)
        return write_lora_file(Path(folder) / LORA_WEIGHT_NAME, lora_state, metadata.get("lora_config"))


# --- validation pipeline -------------------------------------------------------------------------------


class TextPromptProcessor:
    """The text-only part of diffusers' ``OmniGenMultiModalProcessor``, without torchvision: prompts in
    OmniGen's template, the negative prompt for guidance, batched by diffusers' own ``OmniGenCollator``.

    ``negative_prompt`` None uses the processor's own default negative prompt (read from diffusers).
    """

    def __init__(self, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_image_size = 1024  # read by the pipeline; no input images are processed here
        self.negative_prompt: str | None = None

    def reset_max_image_size(self, max_image_size: int) -> None:
        self.max_image_size = max_image_size

    @staticmethod
    def default_negative_prompt() -> str:
        from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor

        return inspect.signature(OmniGenMultiModalProcessor.__call__).parameters["negative_prompt"].default

    def _text_input(self, prompt: str) -> dict[str, Any]:
        return {"input_ids": prompt_token_ids(self.tokenizer, prompt, self.max_tokens), "pixel_values": None,
                "image_sizes": None}

    def __call__(self, instructions, input_images=None, height: int = 1024, width: int = 1024, use_img_cfg=False,
                 use_input_image_size_as_output: bool = False, num_images_per_prompt: int = 1) -> dict:
        from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

        if isinstance(instructions, str):
            instructions = [instructions]
        if input_images is not None and any(images is not None for images in input_images):
            raise ValueError("omnigen: validation generates from text only; input images (editing) are not supported")
        negative = self._text_input(self.negative_prompt if self.negative_prompt is not None
                                    else self.default_negative_prompt())
        features = [(self._text_input(prompt), negative, None, [height, width])
                    for prompt in instructions for _ in range(num_images_per_prompt)]
        return OmniGenCollator()(features)


def _signature_with_negative_prompt(call) -> "inspect.Signature":
    """diffusers' ``__call__`` signature plus ``negative_prompt``: what :class:`OmniGenTextPipeline` takes
    (callers that inspect the signature, e.g. for ``callback_on_step_end``, see every parameter)."""
    signature = inspect.signature(call)
    parameters = list(signature.parameters.values())
    negative = inspect.Parameter("negative_prompt", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
    return signature.replace(parameters=[*parameters[:3], negative, *parameters[3:]])


class OmniGenTextPipeline(OmniGenPipeline):
    """diffusers' ``OmniGenPipeline`` for text-to-image, with a text-only prompt processor (no torchvision)
    that also takes ``negative_prompt`` (the validation runner passes one; diffusers' call has none)."""

    def __init__(self, transformer, scheduler, vae, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS):
        from diffusers import DiffusionPipeline
        from diffusers.image_processor import VaeImageProcessor

        # diffusers' __init__ builds the torchvision processor; the rest of it is repeated here
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.multimodal_processor = TextPromptProcessor(tokenizer, max_tokens)
        self.tokenizer_max_length = tokenizer.model_max_length
        self.default_sample_size = 128

    def __call__(self, prompt, input_images=None, negative_prompt: str | list[str] | None = None, **kwargs):
        if input_images is not None:
            raise ValueError("omnigen: validation generates from text only; input images (editing) are not supported")
        if isinstance(negative_prompt, list):
            if len(set(negative_prompt)) > 1:
                raise ValueError("omnigen: one negative prompt per call (the pipeline batches a single one)")
            negative_prompt = negative_prompt[0] if negative_prompt else None
        self.multimodal_processor.negative_prompt = negative_prompt
        try:
            return super().__call__(prompt=prompt, **kwargs)
        finally:
            self.multimodal_processor.negative_prompt = None

    __call__.__signature__ = _signature_with_negative_prompt(OmniGenPipeline.__call__)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """A folder ``OmniGenPipeline.from_pretrained`` loads: the same components and folders as
        diffusers' pipeline, its ``model_index.json`` naming diffusers' class rather than this one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_file = Path(save_directory) / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8"))
        index["_class_name"] = OmniGenPipeline.__name__
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- loading a saved LoRA -------------------------------------------------------------------------------


def load_lora(pipeline, path: str | Path, adapter_name: str = "default", weight_name: str | None = None
              ) -> torch.nn.Module:
    """Load a LoRA saved by simpletuner's ``omnigen`` family into ``pipeline.transformer``.

    diffusers' ``OmniGenPipeline`` has no ``load_lora_weights``; this is its replacement::

        from diffusers import OmniGenPipeline
        from simpletuner.models.omnigen import load_lora

        pipeline = OmniGenPipeline.from_pretrained("Shitao/OmniGen-v1-diffusers")
        load_lora(pipeline, "output/pytorch_lora_weights.safetensors")  # or the output folder

    ``path`` is the ``.safetensors`` file, a folder holding it, or a Hugging Face repository id;
    ``weight_name`` names the file inside a folder or repository (``pytorch_lora_weights.safetensors`` by
    default). The file has ``transformer.<module path>.lora_A/lora_B.weight`` keys and the alpha in its
    metadata. Returns the adapted transformer (changed in place).
    """
    from peft import inject_adapter_in_model

    from simpletuner.models import lora_formats as formats
    from simpletuner.models.pixart_sigma import lora_config_for

    file = _lora_file(path, weight_name or LORA_WEIGHT_NAME)
    transformer = pipeline.transformer
    states, alphas, _ = formats.peft_state_from_file(formats.LoraFile.read(file), {LORA_PREFIX: transformer}, None)
    state = states.get(LORA_PREFIX)
    if not state:
        raise ValueError(f"{file}: no `{LORA_PREFIX}.*` adapter weights; is this an OmniGen LoRA?")
    module_alphas = alphas.get(LORA_PREFIX, {})
    inject_adapter_in_model(lora_config_for(state, module_alphas), transformer, adapter_name=adapter_name)
    formats.load_peft_state(transformer, state, module_alphas, source=str(file), adapter_name=adapter_name)
    transformer.eval()
    return transformer


def _lora_file(path: str | Path, weight_name: str) -> Path:
    """The LoRA file ``path`` names: itself, ``weight_name`` inside a local folder, or inside a hub repository."""
    local = Path(path)
    if local.is_file():
        return local
    if local.is_dir():
        return local / weight_name
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(path), filename=weight_name))
