"""Compilation, threading and distributed-process settings."""

from __future__ import annotations

from simpletuner.options.spec import MAX_PROCESSES, Option

_G = "performance"

OPTIONS: list[Option] = [
    Option(
        name="dynamo_mode",
        kind="str",
        default=None,
        help="torch.compile optimisation mode; unset uses torch's default. "
        "Takes effect when TRAINING_DYNAMO_BACKEND in config.env names a backend.",
        group=_G,
        choices=("default", "reduce-overhead", "max-autotune"),
        implemented=True,
    ),
    Option(
        name="dynamo_fullgraph",
        kind="bool",
        default=False,
        help="Ask torch.compile to capture each compiled module as a single graph, failing instead of falling back on "
        "graph breaks. Takes effect with TRAINING_DYNAMO_BACKEND.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="dynamo_dynamic",
        kind="bool",
        default=None,
        help="Compile for dynamic shapes (true), for each shape seen (false), or let torch decide after the first "
        "recompilation (unset). Takes effect with TRAINING_DYNAMO_BACKEND.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="dynamo_use_regional_compilation",
        kind="bool",
        default=False,
        help="Compile only the repeated blocks of the denoiser (each block class once, reused), leaving the rest "
        "eager: much shorter cold starts on deep transformers. Takes effect with TRAINING_DYNAMO_BACKEND.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="num_processes",
        kind="int",
        default=None,
        minimum=1, maximum=MAX_PROCESSES,
        help="Training processes on all machines together (one per GPU); more than 1 starts them with accelerate. "
        "TRAINING_NUM_PROCESSES in config.env or the environment overrides a config-file value; the command-line "
        "flag overrides both.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="torch_num_threads",
        kind="int",
        default=None,
        minimum=1,
        help="CPU threads PyTorch may use for its own operations (separate from data workers); unset keeps the PyTorch default.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="enable_multiprocessing",
        kind="bool",
        default=False,
        help="Use worker processes rather than threads when caching metadata.",
        group=_G,
    ),
    Option(
        name="accelerator_cache_clear_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Empty the accelerator's memory cache every N steps to fight slow memory growth.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="zero_stage",
        kind="int",
        default=None,
        minimum=1,
        maximum=3,
        help="Train with DeepSpeed ZeRO through accelerate: 1 splits the optimizer state across processes, 2 also the "
        "gradients, 3 also the weights (gathered whole for every save). Every process checkpoints its own share "
        "(checkpoint-N/zero/), so a resume needs the same process count. Needs the deepspeed package (pip install "
        "'simpletuner[deepspeed]'); refused with block swap, RamTorch, group offload, quantized bases, LyCORIS, "
        "--nan_action skip_batch and --gradient_precision fp32, and under stage 3 with EMA and validation prompts; "
        "see documentation/DISTRIBUTED.md.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="deepspeed_config",
        kind="json",
        default=None,
        help="A DeepSpeed JSON config, inline or as a file, for what zero_stage does not cover (offload_optimizer, "
        "offload_param, bucket sizes); needs a zero_optimization section. Batch size, gradient accumulation, clipping "
        "and precision come from the usual options and may be \"auto\" in it; optimizer and scheduler sections are "
        "refused (simpletuner builds both).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="fsdp_enable",
        kind="bool",
        default=False,
        help="Shard the denoiser's weights, gradients and optimizer state across the processes with FSDP2 "
        "(torch's fully_shard, through accelerate's FSDP plugin). Needs more than one process; LoRA and full "
        "training; see documentation/DISTRIBUTED.md for what it cannot be combined with.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="fsdp_version",
        kind="int",
        default=2,
        minimum=1,
        maximum=2,
        help="FSDP generation; only 2 (per-parameter sharding with DTensor) is supported, 1 is refused.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="fsdp_reshard_after_forward",
        kind="bool",
        default=True,
        help="Free the gathered weights of each block after its forward pass and gather them again for the "
        "backward pass: least memory. false keeps them until the backward pass (less communication, like ZeRO-2).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="fsdp_state_dict_type",
        kind="str",
        default="full",
        choices=("full", "sharded"),
        help="How checkpoints hold the sharded weights and optimizer state: full gathers them and the main process "
        "writes the usual files (resumable with any process count); sharded has every process write its own slices "
        "with torch DCP into checkpoint-N/sharded/ (no gathering, less memory and time on the main process), "
        "resumable only with the same process count. The final LoRA / pipeline is gathered either way.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="fsdp_cpu_ram_efficient_loading",
        kind="bool",
        default=False,
        help="Read the denoiser's weights on the main process only; the other processes build it without weights "
        "(meta device) and receive their slices when FSDP2 shards it, so N processes on one machine hold one copy in "
        "CPU memory instead of N. Refused with --lora_init_type pissa / olora / loftq (they need the base weights on "
        "every process).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="fsdp_transformer_layer_cls_to_wrap",
        kind="str",
        default=None,
        help="Comma-separated class names of the blocks sharded as one unit (each gathered just before it runs). "
        "Unset: the class of the denoiser's repeated blocks, found at start-up.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="hsdp_replicate_dim",
        kind="int",
        default=None,
        minimum=1,
        help="HSDP: how many replicas of the sharded model (the outer dimension of the device mesh, usually the "
        "number of machines). With hsdp_shard_dim, their product must equal num_processes; needs fsdp_enable.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="hsdp_shard_dim",
        kind="int",
        default=None,
        minimum=1,
        help="HSDP: over how many processes each replica is sharded (the inner dimension of the device mesh, "
        "usually the GPUs of one machine). Needs fsdp_enable.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="sp_size",
        kind="int",
        default=1,
        minimum=1,
        help="Sequence parallel (video families that support it: wan, ltxvideo): split each clip's tokens across this many "
        "processes, which exchange them around attention (Ulysses all-to-all), so long clips fit in less memory per "
        "GPU. num_processes must be a multiple of it; the processes of one group train the same batch, so "
        "num_processes / sp_size groups train different batches. See documentation/DISTRIBUTED.md.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="tp_size",
        kind="int",
        default=1,
        minimum=1,
        help="Tensor parallel size. Only 1 (off) is accepted: diffusers has no tensor-parallel plan for the video "
        "families and its tensor parallelism runs only on GPUs; larger values are refused with the reason.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="local_rank",
        kind="int",
        default=None,
        minimum=0,
        help="Process rank on this machine, normally set by the distributed launcher.",
        group=_G,
    ),
]
