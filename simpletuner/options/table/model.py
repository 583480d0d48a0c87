"""Model selection: which architecture, which weights, and how they are loaded."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "model"

MODEL_FAMILIES = (
    "kolors",
    "auraflow",
    "omnigen",
    "flux",
    "deepfloyd",
    "cosmos2image",
    "sana",
    "qwen_image",
    "pixart_sigma",
    "sdxl",
    "sd1x",
    "sd2x",
    "wan",
    "hidream",
    "sd3",
    "lumina2",
    "ltxvideo",
)

OPTIONS: list[Option] = [
    Option(
        name="model_family",
        kind="str",
        default=None,
        help="The kind of model to fine-tune (sd1x: Stable Diffusion 1.x, sdxl: SDXL, sd3: SD 3.x, flux: FLUX.1, ...); it "
        "decides how the model is loaded and most defaults.",
        group=_G,
        choices=MODEL_FAMILIES,
        implemented=True,
        required=True,
    ),
    Option(
        name="model_flavour",
        kind="str",
        default=None,
        help="Named release within the chosen family (for example a dev or schnell build); picks the default weights to download.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="model_type",
        kind="str",
        default="lora",
        help="Train a small adapter on top of frozen weights (lora) or update every weight of the network (full).",
        group=_G,
        choices=("full", "lora"),
        implemented=True,
        required=True,
    ),
    Option(
        name="pretrained_model_name_or_path",
        kind="str",
        default=None,
        help="Hub repository id, local folder or single .safetensors file to start from. "
        "When unset, the flavour's usual checkpoint is used.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="pretrained_vae_model_name_or_path",
        kind="str",
        default=None,
        help="Load the autoencoder from this hub id or folder instead of the one shipped with the base model.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="pretrained_transformer_model_name_or_path",
        kind="str",
        default=None,
        help="Take the transformer (denoiser) weights from a different hub id or folder than the rest of the pipeline.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="pretrained_transformer_subfolder",
        kind="str",
        default=None,
        help="Folder inside the transformer source that holds its weights.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="pretrained_unet_model_name_or_path",
        kind="str",
        default=None,
        help="Take the UNet weights from a different hub id or folder than the rest of the pipeline.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="pretrained_unet_subfolder",
        kind="str",
        default=None,
        help="Folder inside the UNet source that holds its weights.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="pretrained_t5_model_name_or_path",
        kind="str",
        default=None,
        help="Where to load the T5 text encoder from; handy to share one download between several base models.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="pretrained_gemma_model_name_or_path",
        kind="str",
        default=None,
        help="Where to load the Gemma text encoder (and its tokenizer) from for the families that read captions with "
        "Gemma (sana, lumina2), without changing the base model path: a pipeline folder with tokenizer/ and "
        "text_encoder/, a plain Gemma folder, or a hub id.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="revision",
        kind="str",
        default=None,
        help="Branch, tag or commit of the hub repository to download.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="variant",
        kind="str",
        default=None,
        help="Weight file variant to request from the repository, such as fp16.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="controlnet",
        kind="bool",
        default=False,
        help="Train a ControlNet for the base model instead of the model itself (sd1x, sd2x, sdxl, sd3; needs "
        "`--model_type full` and a dataset paired with a `controlnet` conditioning dataset). The base model stays "
        "frozen; the ControlNet is saved to <output_dir>/controlnet. See documentation/CONTROLNET.md.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="controlnet_model_name_or_path",
        kind="str",
        default=None,
        help="Existing ControlNet to continue training (a diffusers ControlNet folder, a hub id, or an earlier run's "
        "output folder) instead of a new one initialised from the base model.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="controlnet_custom_config",
        kind="json",
        default=None,
        help="JSON object (or file) overriding settings of the new ControlNet's diffusers config, e.g. "
        "{\"num_layers\": 6} for an SD3 ControlNet with fewer blocks. Only for a new ControlNet.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="control",
        kind="bool",
        default=False,
        help="Train the model with the control image's latents concatenated to its input channels instead of through "
        "a separate branch, as FLUX.1 Canny/Depth [dev] do (flux; `--model_type full`; a dataset paired with a "
        "`controlnet` conditioning dataset). The input layer is widened with zero weights; the output is a "
        "FluxControlPipeline folder. See documentation/CONTROLNET.md.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="tread_config",
        kind="json",
        default=None,
        help="JSON settings (or a file) for TREAD token routing, which lets some tokens skip layers to speed up training.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="custom_text_encoder_intermediary_layers",
        kind="list",
        default=None,
        help="Experimental, FLUX.2 only: indices of the text encoder hidden layers to feed the model, e.g. [10, 20, 30]. "
        "Changing them invalidates cached text embeddings.",
        group=_G,
    ),
    Option(
        name="fuse_qkv_projections",
        kind="bool",
        default=False,
        help="Merge each attention layer's query, key and value projections into one matmul (sd1x, sd2x, sdxl, "
        "kolors, pixart_sigma, flux). A LoRA on them becomes one LoRA on the fused matrix (q, k and v share its A), "
        "saved split back into ordinary per-projection files; full models are saved unfused. Attention runs on Flash "
        "Attention 3 where diffusers can use it (Hopper GPU, flash_attn_interface installed, flux), else PyTorch SDPA.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="delete_model_after_load",
        kind="bool",
        default=False,
        help="Remove the base model's downloaded files from the Hugging Face cache once they are loaded, to save disk "
        "(the denoiser at once, the text encoders after caching when validation is off, the VAE only when validation is "
        "off). Only local rank 0 deletes; local folders and checkpoints are never touched. The next run downloads again.",
        group=_G,
        implemented=True,
    ),
]
