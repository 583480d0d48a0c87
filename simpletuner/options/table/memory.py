"""Memory savers: gradient checkpointing, offloading, block swapping and RamTorch."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "memory"

OPTIONS: list[Option] = [
    Option(
        name="gradient_checkpointing",
        kind="bool",
        default=False,
        help="Recompute activations during the backward pass instead of storing them: lower peak VRAM, slower steps.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="gradient_checkpointing_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Only checkpoint one block in every N; 1 checkpoints all of them. Currently honoured by SDXL and Flux.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="gradient_checkpointing_backend",
        kind="str",
        default="torch",
        help="torch recomputes activations; unsloth also parks the inputs of each checkpointed block in CPU memory, copied "
        "asynchronously, and brings them back for the backward pass (needs CUDA). Only used with gradient_checkpointing.",
        group=_G,
        choices=("torch", "unsloth"),
        implemented=True,
    ),
    Option(
        name="enable_group_offload",
        kind="bool",
        default=False,
        help="Keep the frozen text encoders and VAE in CPU memory (or on disk) and move their blocks to the GPU only "
        "while they run. For the trained denoiser use musubi_blocks_to_swap. Cannot be combined with "
        "enable_model_cpu_offload, offload_during_startup or ramtorch.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="group_offload_type",
        kind="str",
        default="block_level",
        help="Granularity of group offloading: block_level is the balanced choice, leaf_level saves more VRAM but moves data more often.",
        group=_G,
        choices=("block_level", "leaf_level"),
        implemented=True,
    ),
    Option(
        name="group_offload_blocks_per_group",
        kind="int",
        default=1,
        minimum=1,
        help="With block_level offloading, how many blocks move together; bigger groups mean fewer transfers but more VRAM.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="group_offload_use_stream",
        kind="bool",
        default=False,
        help="Overlap offload transfers with compute on a separate CUDA stream; other backends silently do plain copies.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="group_offload_to_disk_path",
        kind="str",
        default=None,
        help="Folder where offloaded groups are written instead of RAM (one subfolder per component); use a fast local SSD.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="enable_model_cpu_offload",
        kind="bool",
        default=False,
        help="Keep the frozen components (text encoders, VAE) in CPU memory and move each to the accelerator only while it "
        "runs. Mutually exclusive with group offloading.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="musubi_blocks_to_swap",
        kind="int",
        default=0,
        minimum=0,
        help="Keep the frozen weights of the last N transformer blocks on musubi_block_swap_device and copy each block to the "
        "accelerator only while it runs, forward and backward; adapters stay on the accelerator. LoRA training of "
        "transformer families only; 0 turns it off.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="musubi_block_swap_device",
        kind="str",
        default="cpu",
        help="Device string that holds the swapped-out blocks, e.g. cpu or cuda:1.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch",
        kind="bool",
        default=False,
        help="Stream the frozen weights of linear layers from CPU memory to the accelerator one layer at a time, for each use "
        "(forward and backward); adapters stay on the accelerator. Needs CUDA; LoRA training only.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch_target_modules",
        kind="list",
        default=None,
        help="Glob patterns (fnmatch) for the module names or classes RamTorch should convert, e.g. transformer_blocks.0.*; "
        "empty means every linear layer.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch_text_encoder",
        kind="bool",
        default=False,
        help="Also apply RamTorch to the text encoder linear layers.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch_vae",
        kind="bool",
        default=False,
        help="Also stream the linear layers of the autoencoder's mid blocks from CPU memory.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch_controlnet",
        kind="bool",
        default=False,
        help="Apply RamTorch to ControlNet linear layers while training a ControlNet. Refused: RamTorch streams "
        "frozen weights only, and every ControlNet weight trains.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch_transformer_percent",
        kind="int",
        default=100,
        minimum=0, maximum=100,
        help="Share (0-100) of eligible transformer layers converted by RamTorch, counted from the start of the model; "
        "lower keeps more on the GPU and runs faster.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch_text_encoder_percent",
        kind="int",
        default=100,
        minimum=0, maximum=100,
        help="Share (0-100) of text encoder layers converted when ramtorch_text_encoder is on.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ramtorch_disable_sync_hooks",
        kind="bool",
        default=False,
        help="Drop the CUDA synchronisation hooks RamTorch adds; may be faster but risks wrong results from buffer races.",
        group=_G,
    ),
    Option(
        name="ramtorch_disable_extensions",
        kind="bool",
        default=True,
        help="Limit RamTorch to linear layers; set to false to also convert embedding, norm and conv layers.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="memory_budget",
        kind="str",
        default=None,
        help="Accelerator memory the run may use, e.g. 24GiB, 16GB or 8000MiB. `simpletuner plan-memory` (and --dry-run) "
        "then propose the cheapest set of memory options that fits.",
        group=_G,
        metavar="SIZE",
        implemented=True,
    ),
    Option(
        name="offload_during_startup",
        kind="bool",
        default=False,
        help="While the caches are built, keep the text encoders in CPU memory while latents are encoded and the VAE while "
        "captions are encoded, avoiding out-of-memory errors on big models at the price of a slower start.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="offload_during_save",
        kind="bool",
        default=False,
        help="Move the weights being written (the denoiser and trained text encoders) to CPU memory while a checkpoint or the "
        "final model is saved; use it when saving quantised weights runs out of VRAM.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="offload_param_path",
        kind="str",
        default=None,
        help="Folder used to store parameters that are offloaded to disk.",
        group=_G,
    ),
    Option(
        name="unet_attention_slice",
        kind="bool",
        default=False,
        help="Compute SDXL UNet attention in slices to lower peak memory.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="vae_enable_slicing",
        kind="bool",
        default=False,
        help="Let the autoencoder encode and decode a batch one image at a time to save memory.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="vae_enable_tiling",
        kind="bool",
        default=False,
        help="Encode and decode with the autoencoder in overlapping tiles so very large images fit in memory; the tiles' seams "
        "change the latents slightly, so the latent cache is keyed on it.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="vae_enable_patch_conv",
        kind="bool",
        default=False,
        help="Split the HunyuanVideo autoencoder's 3D convolutions into patches, trading a little speed for lower peak VRAM.",
        group=_G,
    ),
    Option(
        name="keep_vae_loaded",
        kind="bool",
        default=False,
        help="Leave the autoencoder in memory for the whole run; less loading from disk, more VRAM in use.",
        group=_G,
    ),
    Option(
        name="fully_unload_text_encoder",
        kind="bool",
        default=False,
        help="Delete the text encoder from memory completely whenever it is not needed.",
        group=_G,
    ),
]
