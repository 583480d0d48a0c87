"""Optimizers by name. Each comes from its own package; nothing is re-implemented here.

The registry maps every ``--optimizer`` name to a class in a package (imported only when that
optimizer is built) plus a few facts about it: which of the shared ``--adam_*`` settings it takes,
presets for named variants, and whether it is schedule-free.

Keyword arguments are assembled in this order, later ones winning:

1. the package's own defaults;
2. ``--adam_weight_decay`` -> ``weight_decay`` and ``--adam_epsilon`` -> ``eps`` for every optimizer
   that has them, ``--adam_beta1`` / ``--adam_beta2`` -> the first two ``betas`` of the Adam family
   (Lion, Adan and SOAP keep their package's betas, which mean something else there); a variant's
   preset (``adamw_schedulefree+aggressive``) replaces these unless the option was set explicitly;
3. ``--optimizer_config`` (see :func:`parse_optimizer_config` for its grammar);
4. ``--optimizer_beta1`` / ``--optimizer_beta2``: the first / second beta of any optimizer with betas.

``adamw_bf16`` is AdamW that stays correct when the trained weights are bfloat16: torch-optimi's
AdamW with Kahan-compensated summation, so tiny updates are not rounded away. All ``optimi-*``
optimizers turn Kahan summation on by themselves for bf16 weights.

This module imports no heavy package at import time: config validation uses its static parts.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from simpletuner.options import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ADAM_SETTINGS = ("betas", "weight_decay", "eps")
# optimizer_config keys that have their own option; the message says which one.
RESERVED_KEYS = {"lr": "--learning_rate", "params": None}


@dataclass(frozen=True)
class OptimizerEntry:
    """One ``--optimizer`` name: where its class lives and how the shared options map onto it."""

    module: str
    attr: str
    package: str  # the name to pip install
    shared: tuple[str, ...] = ADAM_SETTINGS  # which adam_* settings apply ("betas" = adam_beta1/2)
    has_betas: bool = True  # whether optimizer_beta1/2 can apply at all
    presets: dict[str, Any] = field(default_factory=dict)
    schedule_free: bool = False
    kahan_variant: bool = False  # the name promises Kahan-compensated low-precision weights
    paged: bool = False

    @property
    def label(self) -> str:
        return f"{self.module}.{self.attr}"


def _optimi(attr: str, kahan: bool | None = None, **extra) -> OptimizerEntry:
    # kahan_sum=None: torch-optimi turns Kahan summation on for bf16/fp16 weights (Adan's own default is off)
    return OptimizerEntry("optimi", attr, "torch-optimi", presets={"kahan_sum": kahan}, **extra)


def _bnb(attr: str, **extra) -> OptimizerEntry:
    return OptimizerEntry("bitsandbytes.optim", attr, "bitsandbytes", paged=attr.startswith("Paged"), **extra)


def _ao(attr: str) -> OptimizerEntry:
    return OptimizerEntry("torchao.optim", attr, "torchao")


def _schedulefree(kahan: bool, **presets) -> OptimizerEntry:
    return OptimizerEntry("schedulefree", "AdamWScheduleFree", "schedulefree", presets=presets,
                          schedule_free=True, kahan_variant=kahan)


_NO_BETAS = dict(shared=("weight_decay",), has_betas=False)
_OWN_BETAS = ("weight_decay", "eps")

OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw_bf16": _optimi("AdamW", kahan=True),
    "optimi-adamw": _optimi("AdamW"),
    "optimi-stableadamw": _optimi("StableAdamW"),
    "optimi-adam": _optimi("Adam"),
    "optimi-radam": _optimi("RAdam"),
    "optimi-ranger": _optimi("Ranger"),
    "optimi-lion": _optimi("Lion", shared=("weight_decay",)),
    "optimi-adan": _optimi("Adan", shared=_OWN_BETAS),
    "optimi-sgd": _optimi("SGD", **_NO_BETAS),
    # SimpleTuner's presets: the variants trade weight decay and epsilon for faster movement.
    "adamw_schedulefree": _schedulefree(kahan=True),
    "adamw_schedulefree+aggressive": _schedulefree(kahan=True, weight_decay=1e-3, eps=1e-6),
    "adamw_schedulefree+no_kahan": _schedulefree(kahan=False, weight_decay=1e-3, eps=1e-6),
    "prodigy": OptimizerEntry("prodigyopt", "Prodigy", "prodigyopt"),
    "soap": OptimizerEntry("pytorch_optimizer", "SOAP", "pytorch-optimizer", shared=_OWN_BETAS),
    "ao-adamw8bit": _ao("AdamW8bit"),
    "ao-adamw4bit": _ao("AdamW4bit"),
    "ao-adamfp8": _ao("AdamFp8"),
    "ao-adamwfp8": _ao("AdamWFp8"),
    "bnb-adagrad": _bnb("Adagrad", **_NO_BETAS),
    "bnb-adagrad8bit": _bnb("Adagrad8bit", **_NO_BETAS),
    "bnb-adam": _bnb("Adam"),
    "bnb-adam8bit": _bnb("Adam8bit"),
    "bnb-adamw": _bnb("AdamW"),
    "bnb-adamw8bit": _bnb("AdamW8bit"),
    "bnb-adamw-paged": _bnb("PagedAdamW"),
    "bnb-adamw8bit-paged": _bnb("PagedAdamW8bit"),
    "bnb-lion": _bnb("Lion", shared=("weight_decay",)),
    "bnb-lion8bit": _bnb("Lion8bit", shared=("weight_decay",)),
    "bnb-lion-paged": _bnb("PagedLion", shared=("weight_decay",)),
    "bnb-lion8bit-paged": _bnb("PagedLion8bit", shared=("weight_decay",)),
    "bnb-ademamix": _bnb("AdEMAMix"),
    "bnb-ademamix8bit": _bnb("AdEMAMix8bit"),
    "bnb-ademamix-paged": _bnb("PagedAdEMAMix"),
    "bnb-ademamix8bit-paged": _bnb("PagedAdEMAMix8bit"),
}

# The option that sets each shared keyword, for "set explicitly" checks and messages.
_SHARED_OPTION = {"weight_decay": "adam_weight_decay", "eps": "adam_epsilon"}


def optimizer_entry(name: str) -> OptimizerEntry:
    if name not in OPTIMIZERS:
        raise ConfigError(f"`--optimizer {name}` is not available; choose one of: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


# --- optimizer_config ---------------------------------------------------------------------------------

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside () or []."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _scalar(text: str, key: str) -> Any:
    text = text.strip()
    if not text:
        raise ConfigError(f"`--optimizer_config`: `{key}` has an empty value")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


def _value(text: str, key: str) -> Any:
    text = text.strip()
    if not text:
        raise ConfigError(f"`--optimizer_config`: `{key}` has an empty value")
    if text[0] in "([" or text[-1] in ")]":
        if (text[:1], text[-1:]) not in (("(", ")"), ("[", "]")):
            raise ConfigError(f"`--optimizer_config`: `{key}={text}` has unbalanced brackets")
        inner = text[1:-1].strip()
        return tuple(_scalar(item, key) for item in inner.split(",")) if inner else ()
    if ":" in text:
        return tuple(_scalar(item, key) for item in text.split(":"))
    return _scalar(text, key)


def parse_optimizer_config(text: str | dict | None) -> dict[str, Any]:
    """``--optimizer_config`` as keyword arguments.

    Grammar: ``key=value`` pairs separated by commas. A value is ``true``/``false`` (bool),
    ``none`` (None), an integer (``10``), a float (``1e-3``, ``0.5``, ``inf``), a tuple written
    ``0.9:0.99`` or ``(0.9,0.99)``, or else a plain string. Keys are Python identifiers, each at
    most once. ``lr`` is refused: the learning rate comes from ``--learning_rate``.
    A dict (from a JSON config file) is taken as already parsed.
    """
    if text is None:
        return {}
    if isinstance(text, dict):
        pairs = dict(text)
    else:
        pairs = {}
        for part in _split_top_level(text):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(
                    f"`--optimizer_config`: expected key=value, got {part.strip()!r}; separate pairs with commas "
                    "and write tuples as 0.9:0.99 or (0.9,0.99), e.g. `d_coef=0.5,betas=0.9:0.99`"
                )
            key, raw = (piece.strip() for piece in part.split("=", 1))
            if not _KEY.match(key):
                raise ConfigError(f"`--optimizer_config`: {key!r} is not a valid argument name")
            if key in pairs:
                raise ConfigError(f"`--optimizer_config`: `{key}` is given twice")
            pairs[key] = _value(raw, key)
    for key in pairs:
        if key in RESERVED_KEYS:
            use = RESERVED_KEYS[key]
            raise ConfigError(f"`--optimizer_config`: `{key}` cannot be set here"
                              + (f"; use `{use}`" if use else ""))
    return pairs


# --- learning rate ------------------------------------------------------------------------------------

def effective_learning_rate(config, num_processes: int = 1) -> tuple[float, str | None]:
    """``--learning_rate``, scaled by ``--lr_scale`` / ``--lr_scale_sqrt``, and a line saying how."""
    lr = config.learning_rate
    if not config.lr_scale:
        return lr, None
    batch, accumulation = config.train_batch_size, config.gradient_accumulation_steps
    product = batch * accumulation * num_processes
    sqrt = bool(config.lr_scale_sqrt)
    factor = math.sqrt(product) if sqrt else product
    how = (f"lr_scale{'_sqrt' if sqrt else ''}: learning rate {lr:g} x {'sqrt' if sqrt else ''}({batch} batch x "
           f"{accumulation} accumulation x {num_processes} processes) = {lr * factor:g}")
    return lr * factor, how


# --- building -----------------------------------------------------------------------------------------

def _load_class(name: str, entry: OptimizerEntry):
    try:
        module = importlib.import_module(entry.module)
    except ImportError as error:
        raise ConfigError(f"`--optimizer {name}` needs the {entry.package} package ({error}); "
                          f"install it with `pip install {entry.package}`") from None
    return getattr(module, entry.attr)


def _accepted_keywords(cls) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in parameters.items()
            if k not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def optimizer_kwargs(config, name: str, cls) -> dict[str, Any]:
    """Keyword arguments for ``cls`` (everything but ``params`` and ``lr``), in the documented order."""
    entry = OPTIMIZERS[name]
    accepted = _accepted_keywords(cls)
    explicit = config.explicit
    kwargs: dict[str, Any] = {}
    for key, option in _SHARED_OPTION.items():
        if key in entry.shared and key in accepted:
            kwargs[key] = getattr(config, option)
    if "betas" in entry.shared and "betas" in accepted:
        betas = list(accepted["betas"].default)
        betas[0], betas[1] = config.adam_beta1, config.adam_beta2
        kwargs["betas"] = tuple(betas)
    for key, value in entry.presets.items():
        if _SHARED_OPTION.get(key) not in explicit:
            kwargs[key] = value
    extra = parse_optimizer_config(config.optimizer_config)
    unknown = [key for key in extra if key not in accepted]
    if unknown:
        raise ConfigError(
            f"`--optimizer_config`: {entry.label} ({name}) has no argument `{unknown[0]}`; "
            f"it takes: {', '.join(k for k in accepted if k != 'lr')}"
        )
    kwargs.update(extra)
    overrides = {0: config.optimizer_beta1, 1: config.optimizer_beta2}
    overrides = {index: value for index, value in overrides.items() if value is not None}
    if overrides:
        if "betas" not in accepted:
            flag = f"--optimizer_beta{min(overrides) + 1}"
            raise ConfigError(f"`{flag}` does not apply to `--optimizer {name}`: {entry.label} has no betas; remove it")
        betas = list(kwargs.get("betas", accepted["betas"].default))
        for index, value in overrides.items():
            betas[index] = value
        kwargs["betas"] = tuple(betas)
    return kwargs


def _check_parameters(name: str, entry: OptimizerEntry, params: list) -> None:
    if entry.kahan_variant:
        low = sorted({str(p.dtype) for p in params if p.dtype.itemsize < 4 and p.dtype.is_floating_point})
        if low:
            raise ConfigError(
                f"`--optimizer {name}` promises Kahan-compensated updates, but the schedulefree package has no "
                f"Kahan summation and the trainable weights are {', '.join(low)}. Use "
                "`--optimizer adamw_schedulefree+no_kahan` (same method, low-precision rounding uncompensated), "
                "`--optimizer adamw_bf16` (Kahan-compensated AdamW), or train float32 weights "
                "(`--mixed_precision no`; LoRA adapters are always float32)"
            )
    devices = {p.device.type for p in params}
    if entry.paged and devices - {"cuda"}:
        logger.warning("`--optimizer %s`: paged optimizer memory needs CUDA; on %s bitsandbytes runs the "
                       "non-paged version of the same optimizer", name, ", ".join(sorted(devices)))


def _freeze_prodigy_after(optimizer, steps: int) -> None:
    """After ``steps`` optimizer steps Prodigy's step size ``d`` stops changing.

    prodigyopt never lowers ``d`` and grows it by at most ``growth_rate`` per step, so setting its own
    ``growth_rate`` to 1 freezes ``d`` (the one exception, by prodigyopt's design: a ``d`` that never
    left ``d0`` may still take its first estimate). The setting is part of the optimizer state, so it
    survives a resume.
    """
    def freeze(opt, args, kwargs) -> None:
        for group in opt.param_groups:
            if group["k"] >= steps:
                group["growth_rate"] = 1.0

    optimizer.register_step_post_hook(freeze)


def build_optimizer(config, parameters: Iterable[torch.nn.Parameter], num_processes: int = 1,
                    extra_groups: Sequence[tuple[list[torch.nn.Parameter], float]] = ()) -> torch.optim.Optimizer:
    """The optimizer named by ``--optimizer`` over ``parameters``, ready to step (schedule-free ones in train mode).

    ``extra_groups`` are further (parameters, learning rate) groups, e.g. the text encoders with
    ``--text_encoder_lr``; they share every other setting. This is the one place ``--lr_scale`` acts:
    every group's rate, the extra ones included, is scaled by the same factor.

    Raises:
        ConfigError: unknown name, missing package, an ``--optimizer_config`` key the optimizer does
            not take, betas for an optimizer without any, or weights the optimizer cannot serve.
    """
    name = config.optimizer
    entry = optimizer_entry(name)
    params = list(parameters)
    _check_parameters(name, entry, params)
    cls = _load_class(name, entry)
    kwargs = optimizer_kwargs(config, name, cls)
    lr, how = effective_learning_rate(config, num_processes)
    if how:
        logger.info(how)
    scale = lr / config.learning_rate
    extra = [(list(group), group_lr * scale) for group, group_lr in extra_groups if group]
    _check_parameters(name, entry, [p for group, _ in extra for p in group])
    if extra:
        groups = [{"params": params, "lr": lr}] + [{"params": group, "lr": group_lr} for group, group_lr in extra]
        optimizer = cls(groups, lr=lr, **kwargs)
    else:
        optimizer = cls(params, lr=lr, **kwargs)
    logger.info("optimizer %s (%s): lr=%g %s", name, entry.label, lr,
                ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    if entry.schedule_free:
        optimizer.train()
    prodigy_steps = config.prodigy_steps
    if prodigy_steps:
        if name != "prodigy":
            raise ConfigError(f"`--prodigy_steps` only applies to `--optimizer prodigy` (got {name}); remove it")
        _freeze_prodigy_after(optimizer, prodigy_steps)
    return optimizer


# --- schedule-free train / eval mode ------------------------------------------------------------------

def _schedule_free_core(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper keeps the real one here
    if callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None)):
        return inner
    return None


def set_optimizer_mode(optimizer, mode: str) -> None:
    """Put a schedule-free optimizer in ``train`` or ``eval`` mode; a no-op for every other optimizer.

    Schedule-free optimizers step from one point and evaluate at another (the running average):
    ``eval`` swaps the averaged weights into the model, ``train`` swaps the stepping point back.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"optimizer mode must be 'train' or 'eval', not {mode!r}")
    core = _schedule_free_core(optimizer)
    if core is not None:
        getattr(core, mode)()


@contextlib.contextmanager
def optimizer_mode(optimizer, mode: str = "eval") -> Iterator[None]:
    """Hold ``mode`` for the block (validation, checkpoint saving), then return to train mode."""
    set_optimizer_mode(optimizer, mode)
    try:
        yield
    finally:
        set_optimizer_mode(optimizer, "train")


# --- gradients ----------------------------------------------------------------------------------------

def clip_gradients(accelerator, parameters, config) -> float | None:
    """Clip by ``--grad_clip_method``: ``norm`` (default) scales all gradients so their total norm
    is at most ``--max_grad_norm`` and returns that norm before clipping; ``value`` clamps each
    gradient element to ``[-max_grad_norm, max_grad_norm]`` and returns None."""
    limit = config.max_grad_norm
    if not limit:
        return None
    if config.grad_clip_method == "value":
        accelerator.clip_grad_value_(parameters, limit)
        return None
    return accelerator.clip_grad_norm_(parameters, limit)
