"""Adapter training: LoRA (PEFT), LyCORIS, DoRA and related targeting options."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "adapters"

FLUX_LORA_TARGETS = (
    "mmdit",
    "context",
    "context+ffs",
    "all",
    "all+ffs",
    "ai-toolkit",
    "tiny",
    "nano",
    "controlnet",
    "all+ffs+embedder",
    "all+ffs+embedder+controlnet",
)

OPTIONS: list[Option] = [
    Option(
        name="lora_type",
        kind="str",
        default="standard",
        help="standard: an ordinary LoRA (also DoRA or SingLoRA); lycoris: a LyCORIS adapter (LoKr, LoHa, ...) described "
        "by lycoris_config.",
        group=_G,
        choices=("standard", "lycoris"),
        implemented=True,
    ),
    Option(
        name="lora_rank",
        kind="int",
        default=16,
        minimum=1,
        help="Inner dimension of the low-rank matrices; higher ranks can learn more but use more memory and disk.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lora_alpha",
        kind="float",
        default=None,
        minimum=0, exclusive_minimum=True,
        help="Scale applied to the adapter output (alpha / rank). Leave unset to use the rank, giving a scale of 1.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lora_dropout",
        kind="float",
        default=0.1,
        minimum=0, maximum=1, exclusive_maximum=True,
        help="Fraction of adapter activations zeroed at random each step, a mild guard against overfitting.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lora_init_type",
        kind="str",
        default=None,
        help="How the adapter's weights start. Unset: small random values, as diffusers' examples do; default: PEFT's own "
        "random start; pissa and olora: the most important directions of each base weight, which often learns faster; "
        "loftq (CUDA only): a start made for a 4-bit base model.",
        group=_G,
        choices=("default", "gaussian", "loftq", "olora", "pissa"),
        implemented=True,
    ),
    Option(
        name="lora_format",
        kind="str",
        default=None,
        help="How saved LoRA files name their weights: diffusers (loads in the family's diffusers pipeline) or comfyui "
        "(loads completely in ComfyUI). Unset: comfyui for sd1x, sd2x, sdxl and flux, whose comfyui files diffusers "
        "loads too (one file for both, alpha included), diffusers elsewhere and with DoRA or LyCORIS. simpletuner "
        "itself reads either.",
        group=_G,
        choices=("diffusers", "comfyui"),
        implemented=True,
    ),
    Option(
        name="peft_lora_mode",
        kind="str",
        default=None,
        help="standard: the usual LoRA of two matrices per layer; singlora: one square matrix per layer (A·Aᵀ, half the "
        "weights), faded in over singlora_ramp_up_steps.",
        group=_G,
        choices=("standard", "singlora"),
        implemented=True,
    ),
    Option(
        name="peft_lora_target_modules",
        kind="json",
        default=None,
        help="JSON list of module names (or a file holding one) that receive LoRA layers, replacing the family's preset.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="singlora_ramp_up_steps",
        kind="int",
        default=None,
        minimum=1,
        help="Steps over which a SingLoRA adapter's influence is faded in from zero (default 1000).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="slider_lora_target",
        kind="bool",
        default=False,
        help="Place standard LoRA layers on self-attention and conv/time-embedding modules, which suits slider-style concepts.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="flux_lora_target",
        kind="str",
        default=None,
        help="Flux: which transformer modules get LoRA weights. mmdit (default): image-stream attention of every "
        "block; context: text-stream attention of the double blocks (context+ffs adds their text feed-forwards); all: "
        "both; all+ffs: all plus every feed-forward and single-block MLP (all+ffs+embedder adds the image patch "
        "embedder, ai-toolkit the adaptive-norm modulation); tiny / nano: the MLP output of two / one single blocks. "
        "The controlnet presets need ControlNet training, which is not available.",
        group=_G,
        choices=FLUX_LORA_TARGETS,
        implemented=True,
    ),
    Option(
        name="init_lora",
        kind="str",
        default=None,
        help="Existing LoRA or LyCORIS .safetensors file whose weights seed the new adapter.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lycoris_config",
        kind="json",
        default=None,
        help="JSON file (or inline JSON) describing the LyCORIS algorithm, dimensions and target modules.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="init_lokr_norm",
        kind="float",
        default=None,
        minimum=0, exclusive_minimum=True,
        help="Start LoKr layers from a small random change of this size instead of no change; needs \"full_matrix\": true "
        "in lycoris_config.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="use_dora",
        kind="bool",
        default=False,
        help="Train a DoRA adapter, which learns magnitude and direction of the weights separately.",
        group=_G,
        implemented=True,
    ),
]
