"""Loading the components of a diffusers pipeline, shared by the transformer families.

Flux, LTX-Video and Wan (and PixArt for the folder rule) find their transformer, T5 and VAE the same
way: from the base model's pipeline folder or hub id, from a per-component override that may be a
pipeline folder or the component's own folder, or -- for the transformer -- from one original
``.safetensors`` checkpoint that diffusers converts. Keeping that in one place means a fix to the
override rules or to the single-file message reaches every family at once; each family only names its
classes and its pipeline's folder names.

The diffusers / transformers classes are passed in by the families, so nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from simpletuner.models.base import ModelFamily


def component_source(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """Where a component lives inside ``path``: a local folder that has ``subfolder`` is a pipeline
    folder, one without it is the component itself; a hub id is taken to be a pipeline repository."""
    local = Path(path)
    if local.is_dir() and subfolder and not (local / subfolder).is_dir():
        return path, None
    return path, subfolder


def is_single_file(path: str | None) -> bool:
    """Whether ``path`` names one checkpoint file rather than a folder or hub id."""
    return bool(path) and Path(str(path)).suffix in (".safetensors", ".ckpt")


def vae_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a VAE loads in: the run's when it is fp32 or bf16, else fp32 (fp16 overflows in the
    decoders of these VAEs)."""
    return weight_dtype if weight_dtype in (torch.float32, torch.bfloat16) else torch.float32


def load_transformer(family: "ModelFamily", model_class: Any, label: str, subfolder: str = "transformer"):
    """The family's transformer: from the base model, from a single ``.safetensors`` file (the model path
    itself or ``--pretrained_transformer_model_name_or_path``), or from another folder / hub id
    (``--pretrained_transformer_model_name_or_path`` / ``--pretrained_transformer_subfolder``).

    ``label`` names the architecture in the single-file error (e.g. "Flux")."""
    config = family.config
    override = config.pretrained_transformer_model_name_or_path
    override_folder = config.pretrained_transformer_subfolder
    dtype = dict(torch_dtype=family.weight_dtype)
    if is_single_file(override) or (not override and family.is_single_file()):
        return transformer_from_single_file(family, model_class, label, override or family.model_path)
    if override:
        path, folder = (override, override_folder) if override_folder else component_source(override, subfolder)
        return model_class.from_pretrained(path, subfolder=folder, **dtype)
    return model_class.from_pretrained(family.model_path, subfolder=override_folder or subfolder, **dtype,
                                       **family.base_source())


def transformer_from_single_file(family: "ModelFamily", model_class: Any, label: str, file: str):
    """diffusers converts the original checkpoint and takes the architecture from the config source's
    ``transformer`` folder (read from the local Hugging Face cache when offline); a config it cannot
    read becomes one message naming the file, the config source and the option that picks another."""
    try:
        return model_class.from_single_file(file, config=family.config_source, subfolder="transformer",
                                            torch_dtype=family.weight_dtype)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"{file}: a single-file {label} transformer needs the diffusers config of {family.config_source} "
            f"(pick the matching release with --model_flavour), which could not be loaded: {error}"
        ) from error


@dataclass(frozen=True)
class TextFolders:
    """The pipeline folders of one tokenizer / text encoder pair (``tokenizer_2``/``text_encoder_2`` in Flux)."""

    tokenizer: str = "tokenizer"
    encoder: str = "text_encoder"


def load_t5(family: "ModelFamily", folders: TextFolders = TextFolders()):
    """T5's tokenizer and encoder from the base model, or from ``--pretrained_t5_model_name_or_path``
    (a pipeline folder with the family's tokenizer / encoder folders, or a plain T5 folder)."""
    from transformers import T5EncoderModel, T5TokenizerFast

    override = family.config.pretrained_t5_model_name_or_path
    if override:
        path, encoder_folder = component_source(override, folders.encoder)
        _, tokenizer_folder = component_source(override, folders.tokenizer)
        return (T5TokenizerFast.from_pretrained(path, subfolder=tokenizer_folder),
                T5EncoderModel.from_pretrained(path, subfolder=encoder_folder, dtype=family.weight_dtype))
    source = family.config_source
    tokenizer = T5TokenizerFast.from_pretrained(source, subfolder=folders.tokenizer,
                                                **family.base_source(weights=False))
    encoder = T5EncoderModel.from_pretrained(source, subfolder=folders.encoder, dtype=family.weight_dtype,
                                             **family.base_source())
    return tokenizer, encoder


def load_vae(family: "ModelFamily", vae_class: Any, with_variant: bool = True):
    """The VAE from ``--pretrained_vae_model_name_or_path`` (a pipeline folder or the VAE's own folder)
    or else the config source's ``vae`` folder, in :func:`vae_dtype`. ``with_variant`` False loads the
    base model's VAE without ``--variant`` (for releases that ship no variant files for it)."""
    dtype = vae_dtype(family.weight_dtype)
    override = family.config.pretrained_vae_model_name_or_path
    if override:
        path, folder = component_source(override, "vae")
        return vae_class.from_pretrained(path, subfolder=folder, torch_dtype=dtype)
    source = family.base_source(weights=with_variant)
    return vae_class.from_pretrained(family.config_source, subfolder="vae", torch_dtype=dtype, **source)


@dataclass(frozen=True)
class DynamicShiftLine:
    """The line a dynamic-shift sampler draws ``mu`` on: ``base_mu`` at ``base_seq_len`` tokens,
    ``max_mu`` at ``max_seq_len``; the scheduler config's own values win over these fallbacks."""

    base_seq_len: int
    max_seq_len: int
    base_mu: float
    max_mu: float


def sampler_resolution_shift(family: "ModelFamily", scheduler_config, fallback: DynamicShiftLine,
                             latent_frames: int = 1) -> float:
    """The shift the checkpoint's own sampler uses at ``--resolution`` for ``latent_frames`` latent frames
    (1 for images): ``exp(mu)`` from the token count for a dynamic-shift scheduler, its fixed ``shift``
    otherwise or when the resolution is unset."""
    from simpletuner.objectives.flow import auto_shift

    resolution = family.config.resolution
    if not scheduler_config.get("use_dynamic_shifting") or not resolution:
        return float(scheduler_config.get("shift", 1.0))
    from simpletuner.data.buckets import pixel_edge

    edge = pixel_edge(float(resolution), family.config.resolution_type or "pixel")
    tokens = (edge / family.pixels_per_token()) ** 2 * latent_frames
    return float(auto_shift(tokens, base_seq_len=scheduler_config.get("base_image_seq_len", fallback.base_seq_len),
                            max_seq_len=scheduler_config.get("max_image_seq_len", fallback.max_seq_len),
                            base_mu=scheduler_config.get("base_shift", fallback.base_mu),
                            max_mu=scheduler_config.get("max_shift", fallback.max_mu)))


#: The file ``save_lora_weights`` writes in the folder it is given.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def refuse_text_encoder_lora(family: "ModelFamily", text_encoder_states: dict | None) -> None:
    """Families that never train their text encoders have no text-encoder LoRA to write; one handed to
    them is a bug upstream, said rather than dropped."""
    if text_encoder_states:
        plural = "s" if len(family.text_encoder_modules()) > 1 else ""
        raise ValueError(f"{family.family} does not train its text encoder{plural}; no text-encoder LoRA can be saved")


def save_transformer_lora(family: "ModelFamily", pipeline_class: Any, folder: Path, lora_state: dict[str, torch.Tensor],
                          metadata: dict[str, Any], text_encoder_states: dict | None = None) -> Path:
    """Write a transformer LoRA with ``pipeline_class.save_lora_weights`` (``transformer.<module>.lora_A/B``
    keys, the adapter config as metadata), the layout that pipeline's ``load_lora_weights`` reads."""
    refuse_text_encoder_lora(family, text_encoder_states)
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=lora_state, safe_serialization=True,
                                     transformer_lora_adapter_metadata=metadata.get("lora_config"))
    return Path(folder) / LORA_WEIGHT_NAME
