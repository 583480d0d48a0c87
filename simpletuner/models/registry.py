"""The catalogue of model families: what each supports, without importing torch.

Config validation runs before any model loads (and on the CLI's start-up path), so it needs to know
a family's flavours and capabilities without importing its implementation. Each family file reads
its own entry from here; nothing is declared twice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilyInfo:
    """Static facts about a model family.

    Attributes:
        name: the ``--model_family`` value.
        module: where the implementation (a :class:`~simpletuner.models.base.ModelFamily`) lives.
        class_name: the implementation class inside ``module``.
        flavours: ``--model_flavour`` name -> hub id (or a local folder) it stands for.
        default_flavour: used when no flavour and no model path is given.
        prediction_types: the targets this family can be trained on; the first is its default.
        model_types: ``full`` and/or ``lora``.
        text_encoders: the text encoders ``--train_text_encoder`` can train (empty: none).
        options: family-specific options this family acts on (``t5_padding``, ...). An option that
            some family lists here may only be set for the families that list it.
        latent_patch_size: latent cells per side of one transformer token (1 for UNets); bucket
            edges are rounded to whole patches.
        pixel_space: the denoiser works on pixels (no VAE), so one latent cell is one pixel.
        tiny_autoencoder: hub id of the Tiny AutoEncoder (diffusers ``AutoencoderTiny``) trained on this
            family's latent space, the default of ``--tiny_autoencoder_path``; None when there is none.
        native_resolution: edge in pixels of the square images the base model was trained at, which
            ``simpletuner configure`` proposes as ``--resolution``; ``flavour_resolutions`` names the
            flavours trained at another size.
        expert_flavours: flavours whose checkpoint holds two denoisers that split the noise levels
            between them (a high-noise and a low-noise expert); ``--refiner_training`` trains one of them.
    """

    name: str
    module: str
    class_name: str
    flavours: dict[str, str]
    default_flavour: str
    prediction_types: tuple[str, ...]
    model_types: tuple[str, ...] = ("full", "lora")
    text_encoders: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    latent_patch_size: int = 1
    pixel_space: bool = False
    tiny_autoencoder: str | None = None
    native_resolution: int = 1024
    flavour_resolutions: dict[str, int] = field(default_factory=dict)
    expert_flavours: tuple[str, ...] = ()
    notes: str = field(default="", compare=False)

    def resolution_for(self, flavour: str | None) -> int:
        """The native edge of ``flavour`` (the default flavour when None)."""
        return self.flavour_resolutions.get(flavour or self.default_flavour, self.native_resolution)


#: Options that act on a denoiser's repeated transformer blocks (``ModelFamily.transformer_blocks``),
#: so only the families whose denoiser has them list these.
TRANSFORMER_BLOCK_OPTIONS = ("layersync_enabled", "layersync_student_block", "layersync_teacher_block",
                             "layersync_lambda", "tread_config")

#: CREPA's options (simpletuner/regularizers/crepa.py): the DiT families whose blocks it hooks.
CREPA_OPTIONS = ("crepa_enabled", "crepa_block_index", "crepa_lambda", "crepa_adjacent_distance", "crepa_adjacent_tau",
                 "crepa_cumulative_neighbors", "crepa_normalize_neighbour_sum", "crepa_normalize_by_frames",
                 "crepa_spatial_align", "crepa_model", "crepa_encoder_frames_batch_size",
                 "crepa_use_backbone_features", "crepa_teacher_block_index", "crepa_encoder_image_size",
                 "crepa_scheduler", "crepa_warmup_steps", "crepa_decay_steps", "crepa_lambda_end", "crepa_power",
                 "crepa_cutoff_step", "crepa_similarity_threshold", "crepa_similarity_ema_decay",
                 "crepa_threshold_mode")

#: U-REPA's options (simpletuner/regularizers/urepa.py): the UNet families whose mid block it hooks.
UREPA_OPTIONS = ("urepa_enabled", "urepa_lambda", "urepa_manifold_weight", "urepa_model", "urepa_encoder_image_size",
                 "urepa_use_tae", "urepa_scheduler", "urepa_warmup_steps", "urepa_decay_steps", "urepa_lambda_end",
                 "urepa_power", "urepa_cutoff_step", "urepa_similarity_threshold", "urepa_similarity_ema_decay",
                 "urepa_threshold_mode")

FAMILIES: dict[str, FamilyInfo] = {
    "sd1x": FamilyInfo(
        name="sd1x",
        tiny_autoencoder="madebyollin/taesd",
        module="simpletuner.models.sd1x",
        class_name="StableDiffusion1x",
        flavours={
            "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "1.4": "CompVis/stable-diffusion-v1-4",
            "dreamshaper": "Lykon/dreamshaper-8",
            "realvis": "SG161222/Realistic_Vision_V6.0_B1_noVAE",
        },
        default_flavour="1.5",
        prediction_types=("epsilon", "v_prediction", "sample"),
        text_encoders=("text_encoder",),
        options=UREPA_OPTIONS,
        native_resolution=512,
    ),
    "sd2x": FamilyInfo(
        name="sd2x",
        tiny_autoencoder="madebyollin/taesd",
        module="simpletuner.models.sd1x",
        class_name="StableDiffusion2x",
        flavours={
            "2.1": "stabilityai/stable-diffusion-2-1",
            "2.0": "stabilityai/stable-diffusion-2",
            "2.1-base": "stabilityai/stable-diffusion-2-1-base",
            "2.0-base": "stabilityai/stable-diffusion-2-base",
        },
        default_flavour="2.1",
        prediction_types=("v_prediction", "epsilon", "sample"),
        text_encoders=("text_encoder",),
        options=UREPA_OPTIONS,
        native_resolution=768,
        flavour_resolutions={"2.1-base": 512, "2.0-base": 512},
    ),
    "sdxl": FamilyInfo(
        name="sdxl",
        tiny_autoencoder="madebyollin/taesdxl",
        module="simpletuner.models.sdxl",
        class_name="StableDiffusionXL",
        flavours={
            "base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
            "refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
        },
        default_flavour="base-1.0",
        prediction_types=("epsilon", "v_prediction", "sample"),
        text_encoders=("text_encoder", "text_encoder_2"),
        options=("pretrained_unet_model_name_or_path", "pretrained_unet_subfolder", "unet_attention_slice",
                 "refiner_training", "refiner_training_invert_schedule", "refiner_training_strength",
                 "sdxl_refiner_uses_full_range", "data_aesthetic_score", *UREPA_OPTIONS),
    ),
    "kolors": FamilyInfo(
        name="kolors",
        tiny_autoencoder="madebyollin/taesdxl",
        module="simpletuner.models.kolors",
        class_name="Kolors",
        flavours={"1.0": "Kwai-Kolors/Kolors-diffusers"},
        default_flavour="1.0",
        prediction_types=("epsilon", "v_prediction", "sample"),
        options=("tokenizer_max_length", "pretrained_unet_model_name_or_path", "pretrained_unet_subfolder",
                 "unet_attention_slice", "refiner_training", "refiner_training_invert_schedule",
                 "refiner_training_strength", *UREPA_OPTIONS),
    ),
    "sd3": FamilyInfo(
        name="sd3",
        tiny_autoencoder="madebyollin/taesd3",
        module="simpletuner.models.sd3",
        class_name="StableDiffusion3",
        flavours={
            "medium": "stabilityai/stable-diffusion-3.5-medium",
            "large": "stabilityai/stable-diffusion-3.5-large",
            "large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
            "3.0-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
        },
        default_flavour="medium",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "t5_padding", "sd3_clip_uncond_behaviour", "sd3_t5_uncond_behaviour",
                 *TRANSFORMER_BLOCK_OPTIONS, *CREPA_OPTIONS),
        latent_patch_size=2,
    ),
    "deepfloyd": FamilyInfo(
        name="deepfloyd",
        module="simpletuner.models.deepfloyd",
        class_name="DeepFloydIF",
        flavours={
            "i-medium-400m": "DeepFloyd/IF-I-M-v1.0",
            "i-large-900m": "DeepFloyd/IF-I-L-v1.0",
            "i-xlarge-4.3b": "DeepFloyd/IF-I-XL-v1.0",
            "ii-medium-450m": "DeepFloyd/IF-II-M-v1.0",
            "ii-large-1.2b": "DeepFloyd/IF-II-L-v1.0",
        },
        default_flavour="i-medium-400m",
        prediction_types=("epsilon", "v_prediction", "sample"),
        options=("tokenizer_max_length", "t5_padding", "pretrained_t5_model_name_or_path",
                 "pretrained_unet_model_name_or_path", "pretrained_unet_subfolder"),
        pixel_space=True,
        native_resolution=64,
        flavour_resolutions={"ii-medium-450m": 256, "ii-large-1.2b": 256},
    ),
    "pixart_sigma": FamilyInfo(
        name="pixart_sigma",
        tiny_autoencoder="madebyollin/taesdxl",
        module="simpletuner.models.pixart_sigma",
        class_name="PixArtSigma",
        flavours={
            "900M-1024": "terminusresearch/pixart-900m-1024",
            "600M-512": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
            "600M-1024": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
            "600M-2k": "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS",
        },
        default_flavour="900M-1024",
        prediction_types=("epsilon",),
        options=("tokenizer_max_length", "t5_padding", "pretrained_t5_model_name_or_path",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder",
                 *TRANSFORMER_BLOCK_OPTIONS, *CREPA_OPTIONS),
        latent_patch_size=2,
        flavour_resolutions={"600M-512": 512, "600M-2k": 2048},
    ),
    "flux": FamilyInfo(
        name="flux",
        tiny_autoencoder="madebyollin/taef1",
        module="simpletuner.models.flux",
        class_name="Flux",
        flavours={
            "dev": "black-forest-labs/FLUX.1-dev",
            "schnell": "black-forest-labs/FLUX.1-schnell",
            "krea": "black-forest-labs/FLUX.1-Krea-dev",
        },
        default_flavour="dev",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "t5_padding", "pretrained_t5_model_name_or_path",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder",
                 "flux_lora_target", "flux_guidance_mode", "flux_guidance_value", "flux_guidance_min",
                 "flux_guidance_max", "flux_attention_masked_training", "flux_fast_schedule",
                 "validation_guidance_real", "validation_no_cfg_until_timestep", *TRANSFORMER_BLOCK_OPTIONS,
                 *CREPA_OPTIONS),
        latent_patch_size=2,
    ),
    "ltxvideo": FamilyInfo(
        name="ltxvideo",
        module="simpletuner.models.ltxvideo",
        class_name="LTXVideo",
        flavours={
            "0.9.5": "Lightricks/LTX-Video-0.9.5",
            "0.9.1": "Lightricks/LTX-Video-0.9.1",
            "0.9.0": "Lightricks/LTX-Video",
            "0.9.7-dev": "Lightricks/LTX-Video-0.9.7-dev",
            "0.9.7-distilled": "Lightricks/LTX-Video-0.9.7-distilled",
        },
        default_flavour="0.9.5",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_t5_model_name_or_path",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder",
                 "ltx_train_mode", "ltx_i2v_prob", "ltx_partial_noise_fraction", "ltx_protect_first_frame"),
        latent_patch_size=1,
        notes="Video (text- and image-to-video); clips of 8k+1 frames, edges in multiples of 32 pixels.",
    ),
    "wan": FamilyInfo(
        name="wan",
        module="simpletuner.models.wan",
        class_name="Wan",
        flavours={
            "t2v-1.3b-2.1": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            "t2v-14b-2.1": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
            "i2v-480p-14b-2.1": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
            "i2v-720p-14b-2.1": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
            "ti2v-5b-2.2": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            "t2v-5b-2.2": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            "t2v-a14b-2.2": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
            "i2v-a14b-2.2": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        },
        default_flavour="t2v-1.3b-2.1",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_transformer_model_name_or_path",
                 "pretrained_transformer_subfolder", "refiner_training", "refiner_training_invert_schedule",
                 "refiner_training_strength", "causal_chunk_frames", "context_noise"),
        latent_patch_size=2,
        native_resolution=480,
        flavour_resolutions={"t2v-14b-2.1": 720, "i2v-720p-14b-2.1": 720, "ti2v-5b-2.2": 704, "t2v-5b-2.2": 704,
                             "t2v-a14b-2.2": 720, "i2v-a14b-2.2": 720},
        expert_flavours=("t2v-a14b-2.2", "i2v-a14b-2.2"),
        notes="Video (text- and image-to-video); clips of 4k+1 frames, edges in multiples of 16 pixels "
              "(32 for the 2.2 5B model).",
    ),
}


def family_info(name: str) -> FamilyInfo:
    """The catalogue entry for ``name``; an unknown or unimplemented family is a clear error."""
    if name not in FAMILIES:
        from simpletuner.options import ConfigError

        raise ConfigError(
            f"`--model_family {name}` is not supported yet; available families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


def load_family_class(name: str):
    """Import and return the implementation class of a family (this imports torch)."""
    info = family_info(name)
    return getattr(importlib.import_module(info.module), info.class_name)
