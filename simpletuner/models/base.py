"""The model-family contract.

A family is one file that subclasses :class:`ModelFamily` and implements only what differs between
architectures: which components it loads, how prompts become embeddings, how pixels become latents
(and back), how the denoiser is called, and which pipeline validates it. Everything the trainer
needs goes through this interface, so adding a family never touches the trainer.

Cache contract: ``encode_images`` returns *raw* encoder outputs (e.g. the VAE posterior's mean and
std) and ``latents_from_cache`` turns them into training latents (sampling, scaling). Changing a
scaling factor therefore never invalidates a cache.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simpletuner.models.registry import FAMILIES, FamilyInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanFirstFrame:
    """What :meth:`ModelFamily.first_frame_conditioning` answers for one batch.

    Attributes:
        conditioned: bool [B], the samples whose first latent frame is the clean conditioning frame.
        noise_level: the sigma that frame sits at (0: exactly clean; LTX-Video's partial noise above 0).
    """

    conditioned: torch.Tensor
    noise_level: float = 0.0


def on_meta_device(module: torch.nn.Module) -> bool:
    """True for a module built from its config alone (shapes without values, torch's meta device)."""
    return any(parameter.is_meta for parameter in module.parameters())


def build_without_weights(model_class: Any, path: str, subfolder: str | None = None, **kwargs) -> torch.nn.Module:
    """``model_class`` from its config at ``path`` with every parameter on the meta device: the shapes,
    no values and no memory. For the processes of ``--fsdp_cpu_ram_efficient_loading`` other than the
    main one, whose weights arrive from the main process when FSDP2 shards the model. Buffers are made
    for real (they are computed, not loaded, and FSDP2 keeps them whole)."""
    from accelerate import init_empty_weights

    config = model_class.load_config(path, subfolder=subfolder)
    with init_empty_weights(include_buffers=False):
        module = model_class.from_config(config)
    dtype = kwargs.get("torch_dtype")
    return module.to(dtype=dtype) if dtype is not None else module


class ComponentLoading:
    """How a family's components come off disk: diffusers' / transformers' own ``from_pretrained`` and
    ``from_single_file``, unchanged.

    Why a class: quantized loading (``--quantize_via pipeline``, GGUF denoisers) needs to add
    arguments to exactly the calls of one model while it loads. :func:`simpletuner.models.quantize.load_model`
    hands that model a :class:`~simpletuner.models.quantize.QuantizedLoading` for the length of its
    ``load()``; the library classes themselves are never touched, so another model loading in the
    same process is unaffected.
    """

    def from_pretrained(self, family: "ModelFamily", role: str | None, model_class: Any, path: str, **kwargs):
        """``model_class.from_pretrained(path, **kwargs)``; ``role`` names the component (see
        :meth:`ModelFamily.load_component`) for loaders that treat some components differently."""
        return model_class.from_pretrained(path, **kwargs)

    def from_single_file(self, family: "ModelFamily", role: str | None, model_class: Any, file: str, **kwargs):
        """``model_class.from_single_file(file, **kwargs)`` (an original checkpoint diffusers converts)."""
        return model_class.from_single_file(file, **kwargs)


class ModelFamily(ABC):
    """Owns the components of one model and the operations the trainer needs on them."""

    #: Set by subclasses to their registry key.
    family: str = ""
    #: Attribute name of the trained network ("unet" or "transformer"); also its pipeline folder.
    denoiser_name: str = "unet"
    #: Flow-matching families: the schedule shift used when ``--flow_schedule_shift`` is unset
    #: (None: no shift) and the patch size that turns a latent into tokens (for the auto shift).
    default_flow_shift: float | None = None
    flow_patch_size: int = 2
    #: Video families: ``encode_images`` also takes clips (B, C, F, H, W) and returns latents
    #: [B, C, f, h, w]; the data path refuses ``"dataset_type": "video"`` entries for the others.
    encodes_video: bool = False

    def __init__(self, config, device: torch.device, weight_dtype: torch.dtype):
        self.config = config
        self.device = device
        self.weight_dtype = weight_dtype
        self.denoiser: torch.nn.Module | None = None
        #: How :meth:`load_component` loads; swapped per model (never per library class) for quantized loading.
        self.loading: ComponentLoading = ComponentLoading()

    # --- identity ------------------------------------------------------------------------------

    @property
    def info(self) -> FamilyInfo:
        return FAMILIES[self.family]

    @property
    def model_path(self) -> str:
        """The folder, single file or hub id to load: an explicit path wins over the flavour."""
        if self.config.pretrained_model_name_or_path:
            return str(self.config.pretrained_model_name_or_path)
        flavour = self.config.model_flavour or self.info.default_flavour
        return self.info.flavours[flavour]

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type or self.default_prediction_type()

    def default_prediction_type(self) -> str:
        return self.info.prediction_types[0]

    def is_single_file(self) -> bool:
        return Path(self.model_path).suffix in (".safetensors", ".ckpt")

    @property
    def config_source(self) -> str:
        """Where components other than a single-file transformer come from: the model folder or hub
        id, or for a single file the flavour's hub repository (a file carries no configs)."""
        if self.is_single_file():
            return self.info.flavours[self.config.model_flavour or self.info.default_flavour]
        return self.model_path

    def base_source(self, weights: bool = True) -> dict[str, Any]:
        """Keyword arguments that pin a component of the base model: ``--revision`` always, and for
        weights ``--variant`` too (a single file's config source has no variant files)."""
        source: dict[str, Any] = dict(revision=self.config.revision)
        if weights and not self.is_single_file():
            source["variant"] = self.config.variant
        return source

    # --- what each family implements -------------------------------------------------------------

    @abstractmethod
    def load(self) -> None:
        """Load every component onto ``self.device``; frozen parts in ``self.weight_dtype``."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of prompts, as named tensors (batch first), without gradients."""

    def text_conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`encode_prompts` with gradients flowing into the text encoders (``--train_text_encoder``)."""
        raise NotImplementedError(f"{self.family} cannot train its text encoders")

    def unconditional_text(self, empty_prompt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What caption dropout trains with: by default the empty prompt's embeds (from the text
        cache); families whose pipelines use zeros for the negative prompt override this."""
        return empty_prompt

    def validation_defaults(self) -> dict[str, Any]:
        """Family-specific defaults for validation options the user left unset, by option name
        (e.g. ``validation_guidance`` for guidance-distilled models); empty by default."""
        return {}

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Extra keyword arguments the family's pipeline needs at validation (e.g. turning off
        resolution binning); empty by default."""
        return {}

    def training_timestep_window(self) -> tuple[int, int] | None:
        """DDPM families: the ``[begin, end)`` slice of integer timesteps this run trains on (e.g. one
        expert of a base + refiner pair); None, the default, trains on all of them."""
        return None

    def training_sigma_window(self) -> tuple[float, float] | None:
        """Flow-matching families: the ``[low, high)`` range of noise levels (sigma, 0 clean to 1 pure
        noise) this run trains on, e.g. one expert of a two-expert model; None, the default, trains on
        all of them. The configured sigma distribution is mapped into the range."""
        return None

    # --- video -----------------------------------------------------------------------------------
    # A video family sets ``encodes_video`` and, where its VAE compresses time, overrides
    # :meth:`temporal_compression`; the data path then picks clip lengths the VAE accepts
    # (:meth:`accepted_frame_count`) and may mix image datasets in as one-frame clips.

    def temporal_compression(self) -> int:
        """Pixel frames per latent frame after the first: 4 for a causal video VAE that encodes frame 0
        alone and every following group of 4 frames into one latent frame (Wan, LTX-Video); 1 for
        image families, whose "clips" are single images."""
        return 1

    def accepted_frame_count(self, frames: int) -> int | None:
        """The longest clip of at most ``frames`` frames the VAE encodes exactly, or None when even
        one frame is too many (``frames`` < 1).

        A causal video VAE with temporal compression ``t`` takes ``1 + k * t`` frames: the first frame
        plus whole groups of ``t``; anything in between would be cut or padded by the VAE, so the
        data path trains the accepted count below instead of silently changing the clip."""
        if frames < 1:
            return None
        step = self.temporal_compression()
        return 1 + (frames - 1) // step * step

    def accepted_frame_counts_text(self) -> str:
        """The clip lengths the VAE accepts, for messages (``1, 5, 9, 13, ... (1 + 4k)``)."""
        step = self.temporal_compression()
        if step == 1:
            return "any number of frames"
        return ", ".join(str(1 + k * step) for k in range(4)) + f", ... (1 + {step}k)"

    def latent_frame_count(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` accepted frames (``1 + (frames - 1) / t``)."""
        return 1 + (frames - 1) // self.temporal_compression()

    def trains_images_as_clips(self) -> bool:
        """Whether image datasets may join this family's video training as one-frame clips
        (``encode_images`` then gets (N, C, H, W) images and returns [N, C, 1, h, w] latents). True
        for every video family whose VAE encodes a single frame on its own; a family that cannot
        learn from stills overrides it, and the data path refuses image datasets naming them."""
        return self.encodes_video

    def first_frame_conditioning(self, batch: dict, latents: torch.Tensor,
                                 generator: torch.Generator | None = None) -> "CleanFirstFrame | None":
        """Image-to-video families that keep the first latent frame clean (spec 004): which samples
        of this batch are conditioned on their first frame, and at which noise level that frame sits.
        The method then leaves those frames un-noised, gives them their own timestep and keeps them
        out of the loss (:mod:`simpletuner.objectives.first_frame`). None, the default: no sample is."""
        return None

    def trainable_text_encoders(self) -> dict[str, torch.nn.Module]:
        """Text encoders ``--train_text_encoder`` may train, by their pipeline component name."""
        return {}

    def text_encoder_modules(self) -> dict[str, torch.nn.Module]:
        """Every loaded text encoder by its pipeline component name (``text_encoder``,
        ``text_encoder_2``, ...); ``--text_encoder_N_precision`` quantizes entry N. The default finds
        the attributes of those names; a family that keeps its encoders elsewhere overrides it."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
        return {name: module for name in names if isinstance(module := getattr(self, name, None), torch.nn.Module)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw latent-encoder outputs for pixels in [-1, 1] (N, C, H, W): the mean and spread of the
        VAE's posterior, so every epoch can draw a fresh latent sample from the cache. A family
        without a KL VAE (DeepFloyd works on pixels) overrides this and :meth:`latents_from_cache`."""
        posterior = self.vae.encode(pixels.to(self.device, dtype=self.vae.dtype)).latent_dist
        return {"latent_mean": posterior.mean.float(), "latent_std": posterior.std.float()}

    def latents_from_cache(self, cached: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Training latents from cached encoder outputs (batched): a posterior sample, shifted by the
        VAE's ``shift_factor`` (SD3, Flux; none for the SD VAEs) and scaled by its ``scaling_factor``."""
        mean, std = cached["latent_mean"], cached["latent_std"]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        config = self.vae.config
        return (mean + std * noise - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        """The denoiser's output for a batch, shaped like ``noisy_latents`` (families that pack
        latents into tokens unpack the output again).

        ``batch`` is the data batch, for families that condition on more than text: per-sample
        ``original_size`` / ``crop_top_left`` / ``target_size`` (SDXL micro-conditioning), etc.
        ``timesteps`` is one value per sample [B]; video families also take one per latent frame
        [B, F] (a clean first frame at 0, or causal SFT's chunks).
        """

    @abstractmethod
    def noise_scheduler(self):
        """The training noise schedule (a diffusers scheduler)."""

    @abstractmethod
    def build_pipeline(self, denoiser: torch.nn.Module | None = None):
        """An inference pipeline around ``denoiser`` (default: the trained one) for validation."""

    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module names a default LoRA adapts."""

    def lora_components(self) -> dict[str, torch.nn.Module]:
        """The pipeline components a denoiser LoRA file names, by key prefix: the denoiser itself by
        default. A denoiser made of several pipeline components (Wan 2.2's two experts) names each;
        its key prefix is also its attribute path inside the denoiser, so a file read back per
        component lands on the right layers."""
        return {self.denoiser_name: self.denoiser}

    @abstractmethod
    def save_lora(self, folder: Path, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Write adapter weights in the layout the family's pipeline loads; returns the file."""

    @abstractmethod
    def save_full(self, folder: Path, denoiser: torch.nn.Module) -> Path:
        """Write a complete pipeline folder with ``denoiser`` in place of the base one."""

    # --- ControlNet (--controlnet: models/controlnet.py, methods/controlnet.py) ----------------------
    # A family that lists ``controlnet_class`` in its FamilyInfo implements these three; the config
    # rules refuse ``--controlnet`` for every other family before a model loads.

    #: the ControlNet a ``--controlnet`` run trains (set by methods/controlnet.py), None otherwise
    controlnet: torch.nn.Module | None = None

    def controlnet_from_denoiser(self, overrides: dict[str, Any] | None) -> torch.nn.Module:
        """A new ControlNet initialised from the denoiser, its config overridden by ``overrides``."""
        raise NotImplementedError(f"{self.family} has no ControlNet support")

    def controlnet_predict(self, controlnet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           text: dict[str, torch.Tensor], control_pixels: torch.Tensor,
                           batch: dict | None = None) -> torch.Tensor:
        """:meth:`predict` with ``controlnet``'s residuals added, conditioned on ``control_pixels``
        (B, 3, H, W) in [-1, 1]; fed exactly as the family's diffusers ControlNet pipeline feeds them."""
        raise NotImplementedError(f"{self.family} has no ControlNet support")

    def controlnet_pipeline(self, controlnet: torch.nn.Module, denoiser: torch.nn.Module | None = None):
        """The family's diffusers ControlNet pipeline around ``controlnet`` (validation)."""
        raise NotImplementedError(f"{self.family} has no ControlNet support")

    def controlnet_image_argument(self) -> str:
        """The name under which the ControlNet (or ``--control``) pipeline's ``__call__`` takes the control image."""
        return "image"

    # --- loading components ------------------------------------------------------------------------
    # Family files load every model component through these methods rather than calling
    # ``SomeClass.from_pretrained`` themselves, so quantized loading (quantize.QuantizedLoading) reaches
    # every family without the family knowing about it.

    def component_loading(self) -> ComponentLoading:
        """The loader in effect for this model (a family built without ``ModelFamily.__init__`` gets the plain one)."""
        return getattr(self, "loading", None) or ComponentLoading()

    def load_component(self, role: str | None, model_class: Any, path: str, **kwargs):
        """One model component from a folder or hub id: ``model_class.from_pretrained(path, **kwargs)``
        through this model's loader. ``role`` is what the component is to quantization: ``"denoiser"``,
        a text encoder's pipeline name (``"text_encoder"``, ``"text_encoder_2"``, ...), or anything
        else (``"vae"``, None) for components that are never quantized."""
        return self.component_loading().from_pretrained(self, role, model_class, path, **kwargs)

    def load_denoiser(self, model_class: Any, path: str, **kwargs):
        """The trained network (UNet or transformer), see :meth:`load_component`. ``path`` may also be
        a ``.gguf`` file, or a folder whose denoiser subfolder holds one (loaded quantized)."""
        return self.load_component("denoiser", model_class, path, **kwargs)

    def load_text_encoder(self, name: str, model_class: Any, path: str, **kwargs):
        """Text encoder ``name`` (its pipeline component name, which ``--text_encoder_N_precision`` refers to)."""
        return self.load_component(name, model_class, path, **kwargs)

    def load_single_file_component(self, role: str | None, model_class: Any, file: str, **kwargs):
        """A component from one original checkpoint file (``model_class.from_single_file``)."""
        return self.component_loading().from_single_file(self, role, model_class, file, **kwargs)

    def place(self, module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Move a loaded component to ``self.device`` and, given ``dtype``, cast it. A component the
        loader quantized (``hf_quantizer`` set) keeps the dtype it was loaded in: diffusers refuses to
        cast a quantized model, and its unquantized parts were loaded in the right type already."""
        if on_meta_device(module):  # --fsdp_cpu_ram_efficient_loading: filled on its device when sharded
            return module.to(dtype=dtype) if dtype is not None else module
        if dtype is not None and getattr(module, "hf_quantizer", None) is None:
            return module.to(self.device, dtype=dtype)
        return module.to(self.device)

    def place_in_weight_dtype(self, modules: list[torch.nn.Module], vae: torch.nn.Module | None = None) -> None:
        """:meth:`place` each module in ``self.weight_dtype``; the ``vae`` stays fp32 below bf16
        (fp16 SD-style VAEs overflow), see :func:`simpletuner.models.components.vae_dtype`."""
        from simpletuner.models.components import vae_dtype

        for module in modules:
            self.place(module, vae_dtype(self.weight_dtype) if module is vae else self.weight_dtype)

    def load_single_file_pipeline(self, pipeline_class: Any, needs: str = "the diffusers configs",
                                  errors: tuple[type[BaseException], ...] = (OSError, ValueError)):
        """A whole pipeline from one original checkpoint (``--pretrained_model_name_or_path`` a file).

        A single file holds weights only; diffusers takes the component configs (and whatever the
        file lacks) from the flavour's hub folder, read from the local Hugging Face cache when
        offline. A source it cannot read becomes one message naming the file, what it ``needs`` and
        the option that picks another source."""
        config_source = self.info.flavours[self.config.model_flavour or self.info.default_flavour]
        try:
            return pipeline_class.from_single_file(self.model_path, config=config_source)
        except errors as error:
            raise RuntimeError(
                f"{self.model_path}: a single-file checkpoint needs {needs} of {config_source} "
                f"(pick another with --model_flavour), which could not be loaded: {error}"
            ) from error

    # --- shared helpers ----------------------------------------------------------------------------

    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def load_vae(self, path: str):
        """The family's AutoencoderKL: from ``--pretrained_vae_model_name_or_path`` (a hub id or a
        folder, using its ``vae/`` subfolder when it has one) or else from ``path``'s ``vae`` folder."""
        from diffusers import AutoencoderKL

        if self.config.pretrained_vae_model_name_or_path:
            vae_path = self.config.pretrained_vae_model_name_or_path
            subfolder = "vae" if (Path(vae_path) / "vae").is_dir() else None
            return self.load_component("vae", AutoencoderKL, vae_path, subfolder=subfolder)
        return self.load_component("vae", AutoencoderKL, path, subfolder="vae", revision=self.config.revision,
                                   variant=self.config.variant)

    def pixels_per_token(self) -> int:
        """Pixels per side of one denoiser input position: a latent cell, or for transformers that
        split latents into patches a whole patch. Bucket edges are multiples of it."""
        return self.vae_scale_factor() * self.info.latent_patch_size

    def fingerprint_parts(self) -> dict[str, str]:
        """What identifies the encoders, for cache keys: change the model, rebuild the cache.

        The text-embed cache uses this; families add their text settings (padding, token count,
        the T5 source) here. The latent cache uses :meth:`latent_fingerprint_parts`, so a text
        setting never invalidates the latents.
        """
        from simpletuner.options.quantization_rules import text_encoder_fingerprint

        return {**self._encoder_identity(), **text_encoder_fingerprint(self.config)}  # quantized encoders differ

    def latent_fingerprint_parts(self) -> dict[str, str]:
        """What identifies the latent encoder (the VAE), for the latent cache's keys.

        Options that change what the VAE produces join the key only when set away from their
        default, so caches written before the option existed keep their key and stay valid.
        """
        parts = self._encoder_identity()
        if self.config.vae_enable_tiling:
            parts["vae_tiling"] = "on"  # blended tile seams change the latents (slicing does not)
        if self.config.vae_dtype not in (None, "default"):
            parts["vae_dtype"] = str(self.config.vae_dtype)  # latents encoded in fp16/bf16 differ from fp32 ones
        else:  # the family's choice, which follows --mixed_precision: a half-precision VAE keys its latents too
            half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(getattr(getattr(self, "vae", None), "dtype", None))
            if half is not None:
                parts["vae_dtype"] = half
        return parts

    def _encoder_identity(self) -> dict[str, str]:
        return {"family": self.family, "model": self.model_path, "revision": str(self.config.revision),
                "variant": str(self.config.variant),
                "vae": str(self.config.pretrained_vae_model_name_or_path or self.model_path)}

    def enable_gradient_checkpointing(self, interval: int | None = None) -> int:
        """Recompute activations in the backward pass, in every ``interval``-th block (default: all).

        diffusers marks each checkpointable block with a ``gradient_checkpointing`` flag; switching
        only some of them back off trades a little memory for speed. Returns how many blocks
        checkpoint.
        """
        self.denoiser.enable_gradient_checkpointing()
        blocks = [m for m in self.denoiser.modules() if getattr(m, "gradient_checkpointing", None) is True]
        step = interval or 1
        for index, block in enumerate(blocks):
            block.gradient_checkpointing = index % step == 0
        return sum(1 for block in blocks if block.gradient_checkpointing)

    #: ModuleLists of the denoiser that hold its repeated blocks, in the order the forward runs them.
    block_list_names: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")

    def transformer_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """The denoiser's repeated transformer blocks as ``(module path, block)``, in execution order
        (block swap moves them; empty for UNets, whose blocks differ from level to level)."""
        blocks = []
        for list_name in self.block_list_names:
            modules = getattr(self.denoiser, list_name, None)
            if isinstance(modules, torch.nn.ModuleList):
                blocks += [(f"{list_name}.{index}", block) for index, block in enumerate(modules)]
        return blocks

    def freeze_encoders(self) -> None:
        """Encoders are never trained here; keep them in eval mode without gradients."""
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def frozen_modules(self) -> list[torch.nn.Module]:
        return []


def checkpoint_every_nth_block(model: torch.nn.Module, blocks: list[torch.nn.Module], interval: int | None) -> int:
    """Gradient checkpointing for diffusers transformers, in every ``interval``-th of ``blocks``
    (default: all); returns how many blocks recompute.

    diffusers' transformers (SD3, Flux, ...) have one switch for all their blocks and hand each block
    to the model's checkpointing function, so that function decides per block; counted in the order
    of ``blocks``.
    """
    from torch.utils.checkpoint import checkpoint

    step = interval or 1
    positions = {id(block): index for index, block in enumerate(blocks)}

    def checkpoint_every_nth(block, *args):
        if positions.get(id(block), 0) % step:
            return block(*args)
        return checkpoint(block.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_every_nth)
    return sum(1 for index in positions.values() if index % step == 0)
