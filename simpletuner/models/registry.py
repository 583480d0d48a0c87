"""The catalogue of model families: what each supports, without importing torch.

Config validation runs before any model loads (and on the CLI's start-up path), so it needs to know
a family's flavours and capabilities without importing its implementation. Each family file reads
its own entry from here; nothing is declared twice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from simpletuner.models.lora_naming import CLIP_ROOTS, KOHYA_SD, LTX_NATIVE_NAMES, WAN_NATIVE_NAMES, ComfyNaming


@dataclass(frozen=True)
class ValidationCapabilities:
    """What the family's validation pipeline can do, so the validation options are refused up front
    where the pipeline would ignore them (each is checked against diffusers in tests/validation).

    Attributes:
        guidance_rescale: its pipeline ``__call__`` takes ``guidance_rescale``.
        embedded_guidance: ``--validation_guidance`` is a value fed to the model (no unconditional pass).
        skip_layer_guidance: its pipeline ``__call__`` takes ``skip_guidance_layers``.
        step_preview: its pipeline calls ``callback_on_step_end`` and a Tiny AutoEncoder decodes its
            latents (``--validation_preview``).
        img2img: diffusers has an img2img sibling of its pipeline (validation from dataset pictures).
        image_to_video: dataset pictures become the first frames of an image-to-video flavour.
    """

    guidance_rescale: bool = False
    embedded_guidance: bool = False
    skip_layer_guidance: bool = False
    step_preview: bool = False
    img2img: bool = False
    image_to_video: bool = False


@dataclass(frozen=True)
class PlannerShape:
    """What the memory planner needs to know about a family before reading its weights.

    Attributes:
        denoiser_class: the diffusers class of the denoiser (also the class diffusers must be able to
            load from one GGUF file when ``gguf_single_file`` is set).
        activation_kind: which fitted activation coefficients of ``memory/planner.py`` apply (``unet``,
            ``flux``, ``sd3``, ``pixart``; ``transformer`` borrows FLUX's).
        text_tokens: text tokens one cached prompt holds when ``--tokenizer_max_length`` is unset.
        fixed_text_tokens: tokens added to that length whatever it is (SD3 joins 77 CLIP tokens to T5's).
        text_encoder_count: text encoders the family loads (``--text_encoder_N_precision`` beyond is refused).
        gguf_single_file: diffusers can load the denoiser from a single (GGUF) file.
        block_count_keys: the denoiser config keys whose values add up to its number of transformer
            blocks (FLUX: double + single blocks); unused for UNets.
        token_patch: latent cells per side of one token when the denoiser's ``patch_size`` does not say
            it (FLUX packs 2x2 cells itself, its config says 1); 0: read ``patch_size``.
    """

    denoiser_class: str
    activation_kind: str
    text_tokens: int
    text_encoder_count: int
    fixed_text_tokens: int = 0
    gguf_single_file: bool = False
    block_count_keys: tuple[str, ...] = ("num_layers",)
    token_patch: int = 0


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
        text_encoder_refusal: why ``--train_text_encoder`` is refused for a family without ``text_encoders``
            (shown in the message; empty: the generic reason).
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
        planner: the memory planner's and quantization rules' shape of the family (:class:`PlannerShape`).
        validation: what its validation pipeline can do (:class:`ValidationCapabilities`).
        video: the family makes video (``ModelFamily.encodes_video``).
        block_classes: class names of the denoiser's repeated blocks (transformer blocks, UNet levels),
            the units hooks and FSDP auto-wrap work on.
        qkv_fusion_refusal: why ``--fuse_qkv_projections`` cannot work for it; empty when diffusers fuses its
            attention into the same computation (tests/memory/test_qkv_fusion.py checks both ways).
        comfy_naming: how its LoRA keys are named in the layout ComfyUI loads; None: ComfyUI has no key map
            for it, and ``--lora_format comfyui`` is refused.
        comfy_refusal: for a family without ``comfy_naming``, why ComfyUI cannot take its LoRA (shown when
            ``--lora_format comfyui`` is refused; empty: the generic message).
        comfy_loads_in_diffusers: diffusers' ``load_lora_weights`` also reads the ComfyUI-layout file
            completely, so that layout is the default one (one file for both).
        tiny_builder: module with ``build_tiny_pipeline(seed)``, the offline tiny model of the family.
        controlnet_class: the diffusers class of the family's ControlNet (``--controlnet``), which its
            diffusers ControlNet pipeline loads; empty: the family does not support ControlNet training.
        channel_control: ``--control`` works for it: the control image's latents are concatenated to the
            denoiser's input channels (Flux Control, models/flux_control.py).
        refused_flavours: releases of the family that cannot be trained here yet, flavour -> why (the
            config check names the reason instead of a bare "not a flavour").
        sequence_parallel: ``--sp_size`` can split its denoiser's tokens across processes: diffusers'
            context-parallel plan for the denoiser (or simpletuner's own, ``OWN_PLANS`` in
            training/sequence_parallel.py) also trains (backward through the all-to-all), which
            tests/training/test_sequence_parallel.py proves against a single process.
        lora_usage: Python lines that load one of its LoRAs, shown on the model card, for a family whose
            diffusers pipeline has no ``load_lora_weights`` (``{base}``, ``{source}`` and ``{weights}`` are
            filled in, JSON-quoted); empty: ``DiffusionPipeline`` + ``load_lora_weights``.
    """

    name: str
    module: str
    class_name: str
    flavours: dict[str, str]
    default_flavour: str
    prediction_types: tuple[str, ...]
    model_types: tuple[str, ...] = ("full", "lora")
    text_encoders: tuple[str, ...] = ()
    text_encoder_refusal: str = ""
    options: tuple[str, ...] = ()
    latent_patch_size: int = 1
    pixel_space: bool = False
    tiny_autoencoder: str | None = None
    native_resolution: int = 1024
    flavour_resolutions: dict[str, int] = field(default_factory=dict)
    expert_flavours: tuple[str, ...] = ()
    planner: PlannerShape | None = None
    validation: ValidationCapabilities = ValidationCapabilities()
    video: bool = False
    block_classes: tuple[str, ...] = ()
    qkv_fusion_refusal: str = "its attention layers have no fused form here yet"
    comfy_naming: ComfyNaming | None = None
    comfy_refusal: str = ""
    comfy_loads_in_diffusers: bool = False
    tiny_builder: str = ""
    controlnet_class: str = ""
    channel_control: bool = False
    refused_flavours: dict[str, str] = field(default_factory=dict)
    sequence_parallel: bool = False
    lora_usage: tuple[str, ...] = ()
    notes: str = field(default="", compare=False)

    def resolution_for(self, flavour: str | None) -> int:
        """The native edge of ``flavour`` (the default flavour when None)."""
        return self.flavour_resolutions.get(flavour or self.default_flavour, self.native_resolution)

    @property
    def supports_controlnet(self) -> bool:
        """``--controlnet`` can train a ControlNet for this family."""
        return bool(self.controlnet_class)


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
        controlnet_class="ControlNetModel",
        tiny_builder="simpletuner.testing.tiny.sd1x",
        planner=PlannerShape("UNet2DConditionModel", "unet", text_tokens=77, text_encoder_count=1, gguf_single_file=True),
        validation=ValidationCapabilities(guidance_rescale=True, step_preview=True, img2img=True),
        block_classes=("DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"),
        qkv_fusion_refusal="",
        comfy_naming=KOHYA_SD,
        comfy_loads_in_diffusers=True,
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
        controlnet_class="ControlNetModel",
        tiny_builder="simpletuner.testing.tiny.sd2x",
        planner=PlannerShape("UNet2DConditionModel", "unet", text_tokens=77, text_encoder_count=1, gguf_single_file=True),
        validation=ValidationCapabilities(guidance_rescale=True, step_preview=True, img2img=True),
        block_classes=("DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"),
        qkv_fusion_refusal="",
        comfy_naming=KOHYA_SD,
        comfy_loads_in_diffusers=True,
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
        controlnet_class="ControlNetModel",
        tiny_builder="simpletuner.testing.tiny.sdxl",
        planner=PlannerShape("UNet2DConditionModel", "unet", text_tokens=77, text_encoder_count=2, gguf_single_file=True),
        validation=ValidationCapabilities(guidance_rescale=True, step_preview=True, img2img=True),
        block_classes=("DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"),
        qkv_fusion_refusal="",
        # kohya names per STACK.md; diffusers loads them (tests/adapters/test_adapter_types.py)
        comfy_naming=ComfyNaming({"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
                                 roots=CLIP_ROOTS),
        comfy_loads_in_diffusers=True,
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
        tiny_builder="simpletuner.testing.tiny.kolors",
        planner=PlannerShape("UNet2DConditionModel", "unet", text_tokens=256, text_encoder_count=1, gguf_single_file=True),
        validation=ValidationCapabilities(step_preview=True, img2img=True),
        block_classes=("DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"),
        qkv_fusion_refusal="",
        tiny_autoencoder="madebyollin/taesdxl",
        module="simpletuner.models.kolors",
        class_name="Kolors",
        flavours={"1.0": "Kwai-Kolors/Kolors-diffusers"},
        default_flavour="1.0",
        prediction_types=("epsilon", "v_prediction", "sample"),
        text_encoder_refusal="Kolors' ChatGLM3-6B encoder stays frozen: no reference trainer trains it, and a 6B "
                             "language model would need several times the UNet's memory; remove `--train_text_encoder`",
        options=("tokenizer_max_length", "pretrained_unet_model_name_or_path", "pretrained_unet_subfolder",
                 "unet_attention_slice", "refiner_training", "refiner_training_invert_schedule",
                 "refiner_training_strength", *UREPA_OPTIONS),
    ),
    "sd3": FamilyInfo(
        name="sd3",
        controlnet_class="SD3ControlNetModel",
        tiny_builder="simpletuner.testing.tiny.sd3",
        planner=PlannerShape("SD3Transformer2DModel", "sd3", text_tokens=154, fixed_text_tokens=77, text_encoder_count=3,
                             gguf_single_file=True),
        validation=ValidationCapabilities(skip_layer_guidance=True, step_preview=True, img2img=True),
        block_classes=("JointTransformerBlock",),
        qkv_fusion_refusal="diffusers' fused joint-attention processor skips SD3.5's query/key normalisation and its "
                           "second attention layer, so the fused model would compute something else",
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
        # the two CLIPs, as diffusers' and kohya's SD3 trainers train them; T5 stays frozen
        text_encoders=("text_encoder", "text_encoder_2"),
        options=("tokenizer_max_length", "t5_padding", "sd3_clip_uncond_behaviour", "sd3_t5_uncond_behaviour",
                 *TRANSFORMER_BLOCK_OPTIONS, *CREPA_OPTIONS),
        latent_patch_size=2,
    ),
    "deepfloyd": FamilyInfo(
        name="deepfloyd",
        tiny_builder="simpletuner.testing.tiny.deepfloyd",
        planner=PlannerShape("UNet2DConditionModel", "unet", text_tokens=77, text_encoder_count=1, gguf_single_file=True),
        block_classes=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "UNetMidBlock2DSimpleCrossAttn",
                       "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        qkv_fusion_refusal="its UNet's attention has added key/value projections, which diffusers cannot fuse",
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
        text_encoder_refusal="DeepFloyd IF's T5-XXL encoder (4.7B parameters) stays frozen: the reference trainers "
                             "keep it frozen and precompute its embeddings; remove `--train_text_encoder`",
        options=("tokenizer_max_length", "t5_padding", "pretrained_t5_model_name_or_path",
                 "pretrained_unet_model_name_or_path", "pretrained_unet_subfolder"),
        pixel_space=True,
        native_resolution=64,
        flavour_resolutions={"ii-medium-450m": 256, "ii-large-1.2b": 256},
    ),
    "pixart_sigma": FamilyInfo(
        name="pixart_sigma",
        tiny_builder="simpletuner.testing.tiny.pixart_sigma",
        planner=PlannerShape("PixArtTransformer2DModel", "pixart", text_tokens=300, text_encoder_count=1),
        block_classes=("BasicTransformerBlock",),
        qkv_fusion_refusal="",
        # ComfyUI's model_lora_keys_unet maps `transformer.<diffusers path>` for PixArt (its "default
        # format"); the comfyui layout adds the `.alpha` tensors ComfyUI needs when alpha != rank.
        comfy_naming=ComfyNaming({"transformer": "transformer"}, style="dotted"),
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
        text_encoder_refusal="PixArt Sigma's T5-XXL encoder stays frozen: PixArt was trained on precomputed T5 "
                             "embeddings and no reference trainer trains it; remove `--train_text_encoder`",
        options=("tokenizer_max_length", "t5_padding", "pretrained_t5_model_name_or_path",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder",
                 *TRANSFORMER_BLOCK_OPTIONS, *CREPA_OPTIONS),
        latent_patch_size=2,
        flavour_resolutions={"600M-512": 512, "600M-2k": 2048},
    ),
    "flux": FamilyInfo(
        name="flux",
        channel_control=True,
        tiny_builder="simpletuner.testing.tiny.flux",
        planner=PlannerShape("FluxTransformer2DModel", "flux", text_tokens=512, text_encoder_count=2, gguf_single_file=True,
                             block_count_keys=("num_layers", "num_single_layers"), token_patch=2),
        validation=ValidationCapabilities(embedded_guidance=True, step_preview=True, img2img=True),
        block_classes=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
        qkv_fusion_refusal="",
        # ComfyUI and diffusers both load `transformer.<diffusers path>` with lora_A/lora_B (STACK.md), and
        # CLIP-L's `text_encoder.text_model.<path>` (ComfyUI's model_lora_keys_clip "diffusers lora" names)
        comfy_naming=ComfyNaming({"transformer": "transformer", "text_encoder": "text_encoder"}, style="dotted",
                                 roots={"text_encoder": "text_model"}),
        comfy_loads_in_diffusers=True,
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
        # CLIP-L (the pooled embedding), as diffusers' and kohya's FLUX trainers train it; T5 stays frozen
        text_encoders=("text_encoder",),
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
        tiny_builder="simpletuner.testing.tiny.ltxvideo",
        planner=PlannerShape("LTXVideoTransformer3DModel", "transformer", text_tokens=128, text_encoder_count=1),
        validation=ValidationCapabilities(image_to_video=True),
        video=True,
        block_classes=("LTXVideoTransformerBlock",),
        # --sp_size trains with simpletuner's own plan (training/sequence_parallel.py: text kept whole,
        # cross-attention local); diffusers' own LTXVideoTransformer3DModel._cp_plan fails in training
        sequence_parallel=True,
        # ComfyUI maps `diffusion_model.<native path>`; only the patch and timestep embedders are renamed
        comfy_naming=ComfyNaming({"transformer": "diffusion_model"}, style="dotted", renames=LTX_NATIVE_NAMES),
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
        tiny_builder="simpletuner.testing.tiny.wan",
        planner=PlannerShape("WanTransformer3DModel", "transformer", text_tokens=512, text_encoder_count=1),
        validation=ValidationCapabilities(image_to_video=True),
        video=True,
        block_classes=("WanTransformerBlock",),
        sequence_parallel=True,  # diffusers' WanTransformer3DModel._cp_plan trains (--sp_size)
        # ComfyUI maps only the native names under `diffusion_model.` (`blocks.N.self_attn.q`, `cross_attn.k_img`,
        # `ffn.0`, ...); diffusers converts that layout back on load (STACK.md)
        comfy_naming=ComfyNaming({"transformer": "diffusion_model"}, style="dotted", renames=WAN_NATIVE_NAMES),
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
    "auraflow": FamilyInfo(
        name="auraflow",
        tiny_builder="simpletuner.testing.tiny.auraflow",
        # joint (MMDiT) blocks then single blocks over text + image tokens, like Flux's double / single blocks
        planner=PlannerShape("AuraFlowTransformer2DModel", "flux", text_tokens=256, text_encoder_count=1,
                             gguf_single_file=True, block_count_keys=("num_mmdit_layers", "num_single_dit_layers")),
        validation=ValidationCapabilities(step_preview=True),
        block_classes=("AuraFlowJointTransformerBlock", "AuraFlowSingleTransformerBlock"),
        qkv_fusion_refusal="",  # diffusers fuses both streams' q/k/v (to_qkv, to_added_qkv) with equal outputs
        # ComfyUI's model_lora_keys_unet maps `transformer.<diffusers path>` for AuraFlow (every attention,
        # feed-forward and modulation linear of both block kinds); the comfyui layout adds `.alpha` tensors
        comfy_naming=ComfyNaming({"transformer": "transformer"}, style="dotted"),
        tiny_autoencoder="madebyollin/taesdxl",  # AuraFlow decodes with SDXL's VAE
        module="simpletuner.models.auraflow",
        class_name="AuraFlow",
        flavours={
            "v0.3": "fal/AuraFlow-v0.3",
            "v0.2": "fal/AuraFlow-v0.2",
            "v0.1": "fal/AuraFlow",
        },
        default_flavour="v0.3",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_transformer_model_name_or_path",
                 "pretrained_transformer_subfolder"),
        latent_patch_size=2,
        notes="Text encoder UMT5 (Pile-T5-XL); a learned position grid bounds the image edge (the "
              "transformer's `pos_embed_max_size`).",
    ),
    "sana": FamilyInfo(
        name="sana",
        tiny_builder="simpletuner.testing.tiny.sana",
        # a cross-attention DiT like PixArt; 300 Gemma tokens per caption (the instruction is not kept)
        planner=PlannerShape("SanaTransformer2DModel", "pixart", text_tokens=300, text_encoder_count=1,
                             gguf_single_file=True),
        block_classes=("SanaTransformerBlock",),
        qkv_fusion_refusal="Sana's self-attention is linear attention run by its own processor "
                           "(SanaLinearAttnProcessor2_0), which reads the separate q/k/v projections",
        comfy_naming=None,
        comfy_refusal="ComfyUI's LoRA key map (model_lora_keys_unet in comfy/lora.py) has no entry for Sana",
        text_encoder_refusal="Sana's Gemma 2 encoder stays frozen (the reference trainers do not train it either: a "
                             "2B-parameter decoder used as a text encoder)",
        module="simpletuner.models.sana",
        class_name="Sana",
        flavours={
            "1600M-1024": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
            "1600M-512": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
            "1600M-2k": "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers",
            "1600M-4k": "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers",
            "600M-1024": "Efficient-Large-Model/Sana_600M_1024px_diffusers",
            "600M-512": "Efficient-Large-Model/Sana_600M_512px_diffusers",
            "sana1.5-1.6b-1024": "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
            "sana1.5-4.8b-1024": "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers",
        },
        default_flavour="1600M-1024",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_gemma_model_name_or_path", "sana_complex_human_instruction",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder"),
        latent_patch_size=1,
        flavour_resolutions={"1600M-512": 512, "600M-512": 512, "1600M-2k": 2048, "1600M-4k": 4096},
        notes="Text encoder Gemma 2 (2B) with Sana's complex human instruction; AutoencoderDC VAE (32x, 32 "
              "channels), so image edges are multiples of 32 pixels.",
    ),
    "lumina2": FamilyInfo(
        name="lumina2",
        tiny_builder="simpletuner.testing.tiny.lumina2",
        # Next-DiT: joint attention over caption and image tokens in every main layer, like Flux's single blocks
        planner=PlannerShape("Lumina2Transformer2DModel", "flux", text_tokens=256, text_encoder_count=1,
                             gguf_single_file=True),
        block_classes=("Lumina2TransformerBlock",),
        qkv_fusion_refusal="Lumina 2's attention runs its own processor (Lumina2AttnProcessor2_0, grouped-query "
                           "attention with rotary embeddings), which reads the separate q/k/v projections",
        comfy_naming=None,
        comfy_refusal="ComfyUI maps Lumina 2 LoRAs through its Z-Image key table, which cuts k and v out of the "
                      "fused qkv weight as wide as q; Lumina-Image 2.0's grouped-query attention has narrower k and "
                      "v, so ComfyUI would apply them to the wrong rows",
        text_encoder_refusal="Lumina 2's Gemma 2 encoder stays frozen (the reference trainers do not train it "
                             "either: a 2B-parameter decoder used as a text encoder)",
        tiny_autoencoder="madebyollin/taef1",  # Lumina 2 decodes with FLUX.1's VAE
        module="simpletuner.models.lumina2",
        class_name="Lumina2",
        flavours={"2.0": "Alpha-VLLM/Lumina-Image-2.0"},
        default_flavour="2.0",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_gemma_model_name_or_path",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder"),
        latent_patch_size=2,
        notes="Text encoder Gemma 2 (2B) behind the pipeline's system prompt; FLUX.1's 16-channel VAE.",
    ),
    "hidream": FamilyInfo(
        name="hidream",
        tiny_builder="simpletuner.testing.tiny.hidream",
        # dual-stream then single-stream blocks like Flux's; each block sees T5 + the last Llama layer's tokens
        # (fixed here as 256) plus its own Llama layer's (the caption length)
        planner=PlannerShape("HiDreamImageTransformer2DModel", "flux", text_tokens=128, fixed_text_tokens=256,
                             text_encoder_count=4, gguf_single_file=True,
                             block_count_keys=("num_layers", "num_single_layers")),
        validation=ValidationCapabilities(step_preview=True),
        block_classes=("HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock"),
        qkv_fusion_refusal="HiDream's attention runs its own processor (HiDreamAttnProcessor, with RMS-normalised "
                           "queries and keys per stream), which reads the separate q/k/v projections",
        # ComfyUI's model_lora_keys_unet maps `transformer.<native path>` for HiDream, and its native names are
        # diffusers' (diffusers' single-file conversion only strips a prefix); the comfyui layout adds `.alpha`
        comfy_naming=ComfyNaming({"transformer": "transformer"}, style="dotted"),
        text_encoder_refusal="HiDream's four text encoders stay frozen (the reference trainers do not train them "
                             "either; one of them is the 8B-parameter Llama 3.1)",
        tiny_autoencoder="madebyollin/taef1",  # HiDream decodes with FLUX.1's VAE
        module="simpletuner.models.hidream",
        class_name="HiDream",
        flavours={
            "full": "HiDream-ai/HiDream-I1-Full",
            "dev": "HiDream-ai/HiDream-I1-Dev",
            "fast": "HiDream-ai/HiDream-I1-Fast",
        },
        default_flavour="full",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_t5_model_name_or_path",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder",
                 "hidream_use_load_balancing_loss", "hidream_load_balancing_loss_weight"),
        latent_patch_size=2,
        notes="Four text encoders (two long CLIPs, T5, Llama 3.1 8B Instruct from meta-llama unless the model "
              "folder has text_encoder_4); mixture-of-experts blocks; FLUX.1's 16-channel VAE.",
    ),
    "qwen_image": FamilyInfo(
        name="qwen_image",
        tiny_builder="simpletuner.testing.tiny.qwen_image",
        # double-stream (MMDiT) blocks over text + image tokens; 2x2 latent cells per token (config patch_size)
        planner=PlannerShape("QwenImageTransformer2DModel", "flux", text_tokens=512, text_encoder_count=1,
                             gguf_single_file=True),
        block_classes=("QwenImageTransformerBlock",),
        qkv_fusion_refusal="Qwen-Image's attention runs its own processor (QwenDoubleStreamAttnProcessor2_0), "
                           "which reads the separate q/k/v projections of both streams",
        # ComfyUI's model_lora_keys_unet maps `transformer.<path>` for QwenImage (its module names equal
        # diffusers'); the comfyui layout adds `.alpha`. diffusers cannot read that file back (with alphas
        # present its Qwen converter prefixes `transformer.` a second time), so the default stays diffusers'
        comfy_naming=ComfyNaming({"transformer": "transformer"}, style="dotted"),
        text_encoder_refusal="Qwen-Image's Qwen2.5-VL encoder stays frozen (a 7B vision-language decoder used as a "
                             "text encoder; the reference trainers do not train it either)",
        module="simpletuner.models.qwen_image",
        class_name="QwenImage",
        flavours={"v1.0": "Qwen/Qwen-Image"},
        default_flavour="v1.0",
        refused_flavours={
            "edit-v1": "Qwen/Qwen-Image-Edit reads a reference image through the text encoder's vision tower "
                       "for every sample, which this trainer does not encode or cache yet; train the "
                       "text-to-image flavour v1.0",
            "edit-v2": "Qwen/Qwen-Image-Edit-2509 reads up to three reference images through the text encoder's "
                       "vision tower for every sample, which this trainer does not encode or cache yet; train "
                       "the text-to-image flavour v1.0",
        },
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_transformer_model_name_or_path",
                 "pretrained_transformer_subfolder"),
        latent_patch_size=2,
        native_resolution=1328,
        notes="Text encoder Qwen2.5-VL (7B) behind the pipeline's prompt template; a 16-channel causal 3-D VAE "
              "(8 pixels per latent cell), so image edges are multiples of 16 pixels.",
    ),
    "cosmos2image": FamilyInfo(
        name="cosmos2image",
        tiny_builder="simpletuner.testing.tiny.cosmos2image",
        # a cross-attention DiT like PixArt over 1x2x2 patches; 512 T5 tokens per caption
        planner=PlannerShape("CosmosTransformer3DModel", "pixart", text_tokens=512, text_encoder_count=1,
                             token_patch=2),
        block_classes=("CosmosTransformerBlock",),
        qkv_fusion_refusal="Cosmos' attention processor (CosmosAttnProcessor2_0) reads the separate q/k/v "
                           "projections",
        comfy_naming=None,
        comfy_refusal="ComfyUI loads Cosmos-Predict2 LoRAs only under its own module names (its key map has no "
                      "entry for diffusers' CosmosTransformer3DModel names)",
        text_encoder_refusal="Cosmos-Predict2's T5 encoder (the encoder of T5-11B) stays frozen: the released "
                             "models were trained with it frozen and diffusers' Cosmos LoRA loader reads "
                             "transformer adapters only",
        module="simpletuner.models.cosmos2image",
        class_name="Cosmos2Image",
        flavours={
            "2b": "nvidia/Cosmos-Predict2-2B-Text2Image",
            "14b": "nvidia/Cosmos-Predict2-14B-Text2Image",
        },
        default_flavour="2b",
        prediction_types=("flow_matching",),
        # the pipeline has no load_lora_weights and needs a safety checker object (or cosmos_guardrail)
        lora_usage=("from diffusers import Cosmos2TextToImagePipeline",
                    "from simpletuner.models.cosmos2image import PassThroughSafetyChecker", "",
                    "pipeline = Cosmos2TextToImagePipeline.from_pretrained({base}, torch_dtype=torch.bfloat16, "
                    "safety_checker=PassThroughSafetyChecker()).to(\"cuda\")",
                    "pipeline.transformer.load_lora_adapter({source}, weight_name={weights}, prefix=\"transformer\")"),
        options=("tokenizer_max_length", "pretrained_t5_model_name_or_path",
                 "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder"),
        latent_patch_size=2,
        notes="Text encoder T5 (T5-11B's encoder); the Wan 16-channel causal 3-D VAE (8 pixels per latent "
              "cell), so image edges are multiples of 16 pixels; the released transformers need torchvision.",
    ),
    "omnigen": FamilyInfo(
        name="omnigen",
        tiny_builder="simpletuner.testing.tiny.omnigen",
        # one Phi-3-style stack over prompt tokens + a time token + image patches, like Flux's single blocks;
        # no text encoder: the transformer embeds the prompt's tokens itself
        planner=PlannerShape("OmniGenTransformer2DModel", "flux", text_tokens=128, text_encoder_count=0),
        validation=ValidationCapabilities(step_preview=True),
        block_classes=("OmniGenBlock",),
        qkv_fusion_refusal="OmniGen's attention runs its own processor (OmniGenAttnProcessor2_0), which reads the "
                           "separate q/k/v projections",
        comfy_naming=None,
        comfy_refusal="ComfyUI has no OmniGen (v1) model, so no LoRA key map for it (its OmniGen2 support is a "
                      "different architecture)",
        text_encoder_refusal="OmniGen has no text encoder: its transformer embeds the prompt tokens itself, and "
                             "that embedding trains with the transformer (`--model_type full`)",
        tiny_autoencoder="madebyollin/taesdxl",  # OmniGen decodes with SDXL's VAE
        lora_usage=("from diffusers import OmniGenPipeline", "from simpletuner.models.omnigen import load_lora", "",
                    "pipeline = OmniGenPipeline.from_pretrained({base}, torch_dtype=torch.bfloat16).to(\"cuda\")",
                    "load_lora(pipeline, {source}, weight_name={weights})"),
        module="simpletuner.models.omnigen",
        class_name="OmniGen",
        flavours={"v1": "Shitao/OmniGen-v1-diffusers"},
        default_flavour="v1",
        prediction_types=("flow_matching",),
        options=("tokenizer_max_length", "pretrained_transformer_model_name_or_path",
                 "pretrained_transformer_subfolder"),
        latent_patch_size=2,
        notes="No text encoder (the Phi-3-based transformer reads token ids); SDXL's VAE; text-to-image only "
              "(edit prompts with input images are refused).",
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


def families_where(fact) -> tuple[str, ...]:
    """Names of the registered families for which ``fact(info)`` is true, in table order: how a rule
    lists the families an option works for, read from the table at the time of the call."""
    return tuple(name for name, info in FAMILIES.items() if fact(info))
