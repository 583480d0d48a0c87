"""Optimizer choice, learning rate and its schedule."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "optimizer"

OPTIMIZERS = (
    "adamw_bf16",
    "ao-adamw8bit",
    "ao-adamw4bit",
    "ao-adamfp8",
    "ao-adamwfp8",
    "adamw_schedulefree",
    "adamw_schedulefree+aggressive",
    "adamw_schedulefree+no_kahan",
    "optimi-stableadamw",
    "optimi-adamw",
    "optimi-lion",
    "optimi-radam",
    "optimi-ranger",
    "optimi-adan",
    "optimi-adam",
    "optimi-sgd",
    "soap",
    "bnb-adagrad",
    "bnb-adagrad8bit",
    "bnb-adam",
    "bnb-adam8bit",
    "bnb-adamw",
    "bnb-adamw8bit",
    "bnb-adamw-paged",
    "bnb-adamw8bit-paged",
    "bnb-lion",
    "bnb-lion8bit",
    "bnb-lion-paged",
    "bnb-lion8bit-paged",
    "bnb-ademamix",
    "bnb-ademamix8bit",
    "bnb-ademamix-paged",
    "bnb-ademamix8bit-paged",
    "prodigy",
)

LR_SCHEDULERS = (
    "linear",
    "sine",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)

OPTIONS: list[Option] = [
    Option(
        name="optimizer",
        kind="str",
        default="adamw_bf16",
        help="Optimizer algorithm, each from its own package (torch-optimi, schedulefree, prodigyopt, pytorch-optimizer "
        "for soap, torchao for ao-*, bitsandbytes for bnb-*). All run on CPU; bnb-*-paged page memory only on CUDA "
        "and run unpaged elsewhere. adamw_schedulefree and +aggressive refuse bf16 weights (the package has no "
        "Kahan summation): use +no_kahan or adamw_bf16 there.",
        group=_G,
        choices=OPTIMIZERS,
        implemented=True,
    ),
    Option(
        name="optimizer_config",
        kind="str",
        default=None,
        help="Extra optimizer keyword arguments as comma-separated key=value pairs, e.g. d_coef=0.1 for prodigy. "
        "Values: true/false, none, integers, floats (1e-3), tuples as 0.9:0.99 or (0.9,0.99), else strings. "
        "Overrides the adam_* options; lr is not accepted (use learning_rate); unknown keys are an error.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="learning_rate",
        kind="float",
        default=1e-4,
        help="Peak learning rate reached after warmup. LoRA usually wants roughly 1e-5 to 1e-3, full fine-tuning far lower.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="text_encoder_lr",
        kind="float",
        default=None,
        help="Learning rate for the text encoder when it is trained; unset reuses learning_rate.",
        group=_G,
    ),
    Option(
        name="lr_scheduler",
        kind="str",
        default="constant",
        help="Shape of the learning rate curve over the run.",
        group=_G,
        choices=LR_SCHEDULERS,
        implemented=True,
    ),
    Option(
        name="lr_warmup_steps",
        kind="int",
        default=0,
        help="Steps spent ramping the learning rate up from zero at the start.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lr_num_cycles",
        kind="int",
        default=1,
        help="Restart count for the cosine_with_restarts schedule.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lr_power",
        kind="float",
        default=1.0,
        help="Exponent of the polynomial schedule; 1.0 gives a straight line.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lr_end",
        kind="float",
        default=4e-7,
        help="Learning rate the polynomial schedule decays to by the end of training.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lr_scale",
        kind="bool",
        default=False,
        help="Multiply the learning rate by GPU count x accumulation steps x batch size, once when the optimizer is built.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="lr_scale_sqrt",
        kind="bool",
        default=False,
        help="With lr_scale, multiply by the square root of that product instead.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="adam_beta1",
        kind="float",
        default=0.9,
        help="Decay of the running average of gradients in Adam-style optimizers (not Lion, Adan, SOAP, which keep "
        "their own betas). optimizer_config betas and optimizer_beta1 override it.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="adam_beta2",
        kind="float",
        default=0.999,
        help="Decay of the running average of squared gradients in Adam-style optimizers (not Lion, Adan, SOAP). "
        "optimizer_config betas and optimizer_beta2 override it.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="adam_weight_decay",
        kind="float",
        default=1e-2,
        help="Weight decay for every optimizer that has one (decoupled or L2 as that optimizer defines it); "
        "optimizer_config weight_decay overrides it.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="adam_epsilon",
        kind="float",
        default=1e-8,
        help="Tiny value added to the denominator of Adam updates to avoid division by zero; used by every "
        "optimizer with an eps argument except Adagrad and Lion; optimizer_config eps overrides it.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="optimizer_beta1",
        kind="float",
        default=None,
        help="First beta for any optimizer that takes betas; wins over adam_beta1 and optimizer_config betas.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="optimizer_beta2",
        kind="float",
        default=None,
        help="Second beta for any optimizer that takes betas; wins over adam_beta2 and optimizer_config betas.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="prodigy_steps",
        kind="int",
        default=None,
        help="Steps during which Prodigy keeps adjusting its learning rate estimate before freezing it "
        "(prodigy only; unset adapts throughout).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="optimizer_cpu_offload_method",
        kind="str",
        default=None,
        help="Scheme for keeping optimizer state on the CPU; only none is available at present.",
        group=_G,
        choices=("none",),
    ),
    Option(
        name="optimizer_offload_gradients",
        kind="bool",
        default=False,
        help="Hold gradients in CPU memory to relieve the GPU when the optimizer state is offloaded.",
        group=_G,
    ),
    Option(
        name="fuse_optimizer",
        kind="bool",
        default=False,
        help="Use fused update kernels while offloading, lowering memory overhead. Do not combine with gradient accumulation.",
        group=_G,
    ),
    Option(
        name="optimizer_release_gradients",
        kind="bool",
        default=False,
        help="With Optimi optimizers, free each gradient as soon as its parameter has been updated.",
        group=_G,
    ),
    Option(
        name="set_grads_to_none",
        kind="bool",
        default=False,
        help="Reset gradients to None rather than filling them with zeros between steps, which saves a little memory.",
        group=_G,
        implemented=True,
    ),
]
