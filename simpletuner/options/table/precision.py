"""Numeric precision, quantisation and attention kernels."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "precision"

QUANTIZATION_PRESETS = (
    "no_change",
    "int8-quanto",
    "int4-quanto",
    "int2-quanto",
    "int8-torchao",
    "nf4-bnb",
    "int4-torchao",
    "fp8-quanto",
    "fp8uz-quanto",
    "fp8-torchao",
)

ATTENTION_MECHANISMS = (
    "diffusers",
    "xformers",
    "flash-attn",
    "flash-attn-2",
    "flash-attn-3",
    "flash-attn-3-varlen",
    "flex",
    "cudnn",
    "native-efficient",
    "native-flash",
    "native-math",
    "native-npu",
    "native-xla",
    "sla",
    "sageattention",
    "sageattention-int8-fp16-triton",
    "sageattention-int8-fp16-cuda",
    "sageattention-int8-fp8-cuda",
)


def _text_encoder_precision(index: int) -> Option:
    return Option(
        name=f"text_encoder_{index}_precision",
        kind="str",
        default=None,
        help=f"Store text encoder {index} (the pipeline's text_encoder{'' if index == 1 else '_' + str(index)}) in "
        "fewer bits, with the presets of base_model_precision: frees memory at some cost in how exactly prompts are "
        "read. See documentation/QUANTIZATION.md.",
        group=_G,
        choices=QUANTIZATION_PRESETS,
        implemented=True,
    )


OPTIONS: list[Option] = [
    Option(
        name="mixed_precision",
        kind="str",
        default="bf16",
        help="Numeric type used for forward and backward computation: bf16, fp16 (with a loss scaler; LoRA bases are "
        "held in fp16, fully trained weights stay fp32) or no (fp32). fp8 is refused: it needs an Ada/Hopper GPU and "
        "is not supported yet.",
        group=_G,
        choices=("no", "bf16", "fp16", "fp8"),
        implemented=True,
    ),
    Option(
        name="base_model_precision",
        kind="str",
        default=None,
        help="Store the frozen base model (the UNet or transformer) in fewer bits to save memory; the LoRA trains on top "
        "of it (full training needs no_change, the original weights). Presets this machine cannot run are refused "
        "before the model loads; see documentation/QUANTIZATION.md.",
        group=_G,
        choices=QUANTIZATION_PRESETS,
        implemented=True,
    ),
    *(_text_encoder_precision(i) for i in (1, 2, 3, 4)),
    Option(
        name="base_model_default_dtype",
        kind="str",
        default=None,
        help="Type given to base model weights that the quantiser leaves untouched (norms, embeddings, "
        "biases); unset keeps the --mixed_precision type. Only with a quantized base.",
        group=_G,
        choices=("bf16", "fp32"),
        implemented=True,
    ),
    Option(
        name="quantize_via",
        kind="str",
        default="cpu",
        help="Where the base model is quantized: cpu (slow, needs little GPU memory), accelerator (quick, but the whole "
        "model must fit in GPU memory once), or pipeline (by diffusers while it loads, tuned by quantization_config).",
        group=_G,
        choices=("cpu", "accelerator", "pipeline"),
        implemented=True,
    ),
    Option(
        name="quantization_config",
        kind="json",
        default=None,
        help="Per-component Diffusers quantisation settings (keys unet or transformer, text_encoder, text_encoder_2..4, "
        "default), inline or as a file; each entry refines the component's preset. Needs quantize_via=pipeline.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="quantize_activations",
        kind="bool",
        default=False,
        help="Also quantise the base model's activations, not just its weights (int8-torchao: dynamic int8 per "
        "token; fp8-torchao: float8 matmuls on GPUs of compute capability 8.9+).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="vae_dtype",
        kind="str",
        default=None,
        help="Numeric type of the VAE's weights while it encodes training images and decodes validation samples; "
        "default keeps the family's choice (fp32 under fp16 mixed precision, where fp16 VAEs can overflow).",
        group=_G,
        choices=("default", "fp32", "fp16", "bf16"),
        implemented=True,
    ),
    Option(
        name="gradient_precision",
        kind="str",
        default=None,
        help="Keep gradients in fp32, or leave them in whatever type the model produces (unmodified).",
        group=_G,
        choices=("unmodified", "fp32"),
        implemented=True,
    ),
    Option(
        name="attention_mechanism",
        kind="str",
        default="diffusers",
        help="Attention kernel, set through diffusers' attention dispatcher on the denoiser. diffusers means "
        "PyTorch SDPA; native-math/native-flash pick an SDPA kernel; flex (GPU), flash-attn*, xformers and cudnn "
        "(NVIDIA GPUs) need their package or hardware. Classic UNet families take only diffusers. sla and "
        "SageAttention are refused (no training support). See documentation/TRAINING.md.",
        group=_G,
        choices=ATTENTION_MECHANISMS,
        implemented=True,
    ),
    Option(
        name="sageattention_usage",
        kind="str",
        default=None,
        help="Phases in which a SageAttention kernel is active. Its kernels pass no gradients to the QKV projections, "
        "so enabling it for training leaves those layers unlearned.",
        group=_G,
        choices=("training", "inference", "training+inference"),
    ),
    Option(
        name="sla_config",
        kind="json",
        default=None,
        help="JSON (or Python dict) overrides for Sparse-Linear Attention runtime settings, e.g. topk or blkq.",
        group=_G,
    ),
    Option(
        name="disable_tf32",
        kind="bool",
        default=False,
        help="Turn off TF32 matmuls on NVIDIA GPUs and compute in strict fp32; slower but more exact.",
        group=_G,
        implemented=True,
    ),
]
