"""Loading the components of a diffusers pipeline, shared by the transformer families.

Flux, LTX-Video and Wan (and PixArt for the folder rule) find their transformer, T5 and VAE the same
way: from the base model's pipeline folder or hub id, from a per-component override that may be a
pipeline folder or the component's own folder, or -- for the transformer -- from one original
``.safetensors`` checkpoint that diffusers converts. Keeping that in one place means a fix to the
override rules or to the single-file message reaches every family at once; each family only names its
classes and its pipeline's folder names.

The diffusers / transformers classes are passed in by the families, so nothing heavy is imported here.

Two mixins at the end hold what the image transformer families would otherwise each write again:
still-image latents through a video VAE, and the end of loading, LoRA targets and saving for one
pipeline transformer.
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
        return family.load_denoiser(model_class, path, subfolder=folder, **dtype)
    return family.load_denoiser(model_class, family.model_path, subfolder=override_folder or subfolder, **dtype,
                                **family.base_source())


def transformer_from_single_file(family: "ModelFamily", model_class: Any, label: str, file: str):
    """diffusers converts the original checkpoint and takes the architecture from the config source's
    ``transformer`` folder (read from the local Hugging Face cache when offline); a config it cannot
    read becomes one message naming the file, the config source and the option that picks another."""
    try:
        return family.load_single_file_component("denoiser", model_class, file, config=family.config_source,
                                                 subfolder="transformer", torch_dtype=family.weight_dtype)
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


def load_t5(family: "ModelFamily", folders: TextFolders = TextFolders(), tokenizer_class: Any = None):
    """T5's tokenizer and encoder from the base model, or from ``--pretrained_t5_model_name_or_path``
    (a pipeline folder with the family's tokenizer / encoder folders, or a plain T5 folder). The
    encoder loads in the run's weight dtype; ``tokenizer_class`` is the one the family's pipeline
    uses (default ``T5TokenizerFast``)."""
    from transformers import T5EncoderModel, T5TokenizerFast

    tokenizer_type = tokenizer_class or T5TokenizerFast
    override = family.config.pretrained_t5_model_name_or_path
    if override:
        path, encoder_folder = component_source(override, folders.encoder)
        _, tokenizer_folder = component_source(override, folders.tokenizer)
        return (tokenizer_type.from_pretrained(path, subfolder=tokenizer_folder),
                family.load_text_encoder(folders.encoder, T5EncoderModel, path, subfolder=encoder_folder,
                                         dtype=family.weight_dtype))
    source = family.config_source
    tokenizer = tokenizer_type.from_pretrained(source, subfolder=folders.tokenizer, **family.base_source(weights=False))
    encoder = family.load_text_encoder(folders.encoder, T5EncoderModel, source, subfolder=folders.encoder,
                                       dtype=family.weight_dtype, **family.base_source())
    return tokenizer, encoder


def load_vae(family: "ModelFamily", vae_class: Any, with_variant: bool = True):
    """The VAE from ``--pretrained_vae_model_name_or_path`` (a pipeline folder or the VAE's own folder)
    or else the config source's ``vae`` folder, in :func:`vae_dtype`. ``with_variant`` False loads the
    base model's VAE without ``--variant`` (for releases that ship no variant files for it)."""
    dtype = vae_dtype(family.weight_dtype)
    override = family.config.pretrained_vae_model_name_or_path
    if override:
        path, folder = component_source(override, "vae")
        return family.load_component("vae", vae_class, path, subfolder=folder, torch_dtype=dtype)
    source = family.base_source(weights=with_variant)
    return family.load_component("vae", vae_class, family.config_source, subfolder="vae", torch_dtype=dtype, **source)


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


class OneFrameClipLatents:
    """Latents of still images for families that encode them with a video VAE.

    Cosmos 2 (text-to-image) and Qwen-Image both ship Wan's causal 3-D autoencoder: images go through it
    as one-frame clips, and the pipelines undo a per-channel normalisation (``latents_mean`` /
    ``latents_std`` in the VAE config) rather than a global shift and scale. Mixed in before
    :class:`~simpletuner.models.base.ModelFamily`, it replaces the base class's KL-VAE behaviour."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The VAE posterior of images encoded as one-frame clips, returned without the frame axis."""
        posterior = self.vae.encode(pixels.unsqueeze(2).to(self.device, dtype=self.vae.dtype)).latent_dist
        return {"latent_mean": posterior.mean[:, :, 0].float(), "latent_std": posterior.std[:, :, 0].float()}

    def latents_from_cache(self, cached: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample normalised per channel, ``(z - latents_mean) / latents_std``."""
        mean, std = cached["latent_mean"], cached["latent_std"]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        config = self.vae.config
        shape = (1, -1, 1, 1)
        channel_mean = torch.tensor(config.latents_mean, device=mean.device, dtype=mean.dtype).view(shape)
        channel_std = torch.tensor(config.latents_std, device=mean.device, dtype=mean.dtype).view(shape)
        return (mean + std * noise - channel_mean) / channel_std


class OneTransformerFamily:
    """The end of loading, LoRA targets and saving for a family whose denoiser is one diffusers
    transformer that its pipeline's own LoRA loader reads.

    The image transformer families (AuraFlow, Cosmos 2, HiDream, Lumina 2, OmniGen, Qwen-Image, Sana)
    differ here only in which attention projections a LoRA adapts, which diffusers class writes the
    ``transformer.<module>`` LoRA layout, and how their pipeline is assembled (their text encoders and
    VAE stay frozen, their scheduler is the checkpoint's); they name those things
    (:attr:`lora_targets`, :meth:`lora_writer_class`, and :meth:`saved_pipeline` where it is not the
    validation pipeline) and this mixin, placed before :class:`~simpletuner.models.base.ModelFamily`,
    does the rest."""

    #: the module names a default LoRA adapts (the family's attention projections)
    lora_targets: tuple[str, ...] | list[str] = ()

    def adopt_loaded_transformer(self, scheduler_class: Any) -> None:
        """Finish :meth:`load` once the tokenizer, text encoder, VAE and transformer are loaded: the
        training scheduler is the checkpoint's own (``scheduler_class`` from its ``scheduler`` folder),
        the modules go to the device in the dtype each was loaded in, the transformer is the denoiser."""
        self._scheduler = scheduler_class.from_pretrained(self.config_source, subfolder="scheduler",
                                                          **self.base_source(weights=False))
        for module in (self.text_encoder, self.vae, self.transformer):
            self.place(module)
        self.denoiser = self.transformer

    def noise_scheduler(self):
        """The checkpoint's own scheduler, as :meth:`adopt_loaded_transformer` (or the family) set it."""
        return self._scheduler

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every loaded text encoder and the VAE: only the transformer (or its adapter) trains."""
        return [*self.text_encoder_modules().values(), self.vae]

    def lora_writer_class(self) -> Any:
        """The diffusers pipeline or loader mixin whose ``save_lora_weights`` writes the layout the
        family's pipeline loads (imported lazily by the family)."""
        raise NotImplementedError(f"{type(self).__name__} names no LoRA writer class")

    def saved_pipeline(self, denoiser: torch.nn.Module) -> Any:
        """The complete pipeline around ``denoiser`` that a full run saves: the validation pipeline,
        unless the family validates with a subclass users should not get back from the folder."""
        return self.build_pipeline(denoiser)

    def lora_target_modules(self) -> list[str]:
        return list(self.lora_targets)

    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  text_encoder_states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        return save_transformer_lora(self, self.lora_writer_class(), folder, lora_state, metadata, text_encoder_states)

    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        self.saved_pipeline(denoiser).save_pretrained(folder, safe_serialization=True)
        return Path(folder)
