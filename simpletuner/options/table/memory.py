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
        help="Only checkpoint one block in every N; 1 checkpoints all of them. Currently honoured by SDXL and Flux.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="gradient_checkpointing_backend",
        kind="str",
        default="torch",
        help="torch recomputes activations; unsloth copies them to CPU asynchronously instead (needs CUDA and fast PCIe). "
        "Only used when gradient checkpointing is on.",
        group=_G,
        choices=("torch", "unsloth"),
    ),
    Option(
        name="enable_group_offload",
        kind="bool",
        default=False,
        help="Use Diffusers group offloading to park model blocks in CPU memory (or on disk) between uses. "
        "Cannot be combined with enable_model_cpu_offload or ramtorch.",
        group=_G,
    ),
    Option(
        name="group_offload_type",
        kind="str",
        default="block_level",
        help="Granularity of group offloading: block_level is the balanced choice, leaf_level saves more VRAM but moves data more often.",
        group=_G,
        choices=("block_level", "leaf_level"),
    ),
    Option(
        name="group_offload_blocks_per_group",
        kind="int",
        default=1,
        help="With block_level offloading, how many blocks move together; bigger groups mean fewer transfers but more VRAM.",
        group=_G,
    ),
    Option(
        name="group_offload_use_stream",
        kind="bool",
        default=False,
        help="Overlap offload transfers with compute on a separate CUDA stream; other backends silently do plain copies.",
        group=_G,
    ),
    Option(
        name="group_offload_to_disk_path",
        kind="str",
        default=None,
        help="Folder where offloaded groups are written instead of RAM; use a fast local SSD.",
        group=_G,
    ),
    Option(
        name="enable_model_cpu_offload",
        kind="bool",
        default=False,
        help="Keep whole pipeline components on CPU and move each to the accelerator only while it runs. "
        "Mutually exclusive with group offloading.",
        group=_G,
    ),
    Option(
        name="musubi_blocks_to_swap",
        kind="int",
        default=0,
        help="Keep the last N transformer blocks in CPU memory and stream their weights in during the forward pass; 0 turns it off.",
        group=_G,
    ),
    Option(
        name="musubi_block_swap_device",
        kind="str",
        default="cpu",
        help="Device string that holds the swapped-out blocks, e.g. cpu or cuda:1.",
        group=_G,
    ),
    Option(
        name="ramtorch",
        kind="bool",
        default=False,
        help="Swap linear layers for RamTorch versions whose weights live in CPU memory and stream to the GPU on demand. "
        "CUDA or ROCm only; turns on set_grads_to_none.",
        group=_G,
    ),
    Option(
        name="ramtorch_target_modules",
        kind="list",
        default=None,
        help="Glob patterns (fnmatch) for the module names or classes RamTorch should convert, e.g. transformer_blocks.0.*; "
        "empty means every linear layer.",
        group=_G,
    ),
    Option(
        name="ramtorch_text_encoder",
        kind="bool",
        default=False,
        help="Also apply RamTorch to the text encoder linear layers.",
        group=_G,
    ),
    Option(
        name="ramtorch_vae",
        kind="bool",
        default=False,
        help="Experimental: apply RamTorch to the linear layers of the autoencoder mid block.",
        group=_G,
    ),
    Option(
        name="ramtorch_controlnet",
        kind="bool",
        default=False,
        help="Apply RamTorch to ControlNet linear layers while training a ControlNet.",
        group=_G,
    ),
    Option(
        name="ramtorch_transformer_percent",
        kind="int",
        default=100,
        help="Share (0-100) of eligible transformer layers converted by RamTorch, counted from the start of the model; "
        "lower keeps more on the GPU and runs faster.",
        group=_G,
    ),
    Option(
        name="ramtorch_text_encoder_percent",
        kind="int",
        default=100,
        help="Share (0-100) of text encoder layers converted when ramtorch_text_encoder is on.",
        group=_G,
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
    ),
    Option(
        name="offload_during_startup",
        kind="bool",
        default=False,
        help="Move the text encoders to CPU while latents are being cached, avoiding out-of-memory errors on big models "
        "at the price of a slower start.",
        group=_G,
    ),
    Option(
        name="offload_during_save",
        kind="bool",
        default=False,
        help="Briefly move the pipeline to CPU while a checkpoint is written; use it when saving quantised weights runs out of VRAM.",
        group=_G,
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
        help="Let the autoencoder process a batch one slice at a time to save memory.",
        group=_G,
    ),
    Option(
        name="vae_enable_tiling",
        kind="bool",
        default=False,
        help="Encode and decode with the autoencoder in overlapping tiles so very large images fit in memory.",
        group=_G,
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
