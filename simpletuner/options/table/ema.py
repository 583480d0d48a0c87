"""Exponential moving average of the trained weights."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "ema"

OPTIONS: list[Option] = [
    Option(
        name="use_ema",
        kind="bool",
        default=False,
        help="Keep a slowly updated average of the weights alongside the live ones; steadier results for extra memory and time.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ema_decay",
        kind="float",
        default=0.995,
        minimum=0, maximum=1, exclusive_minimum=True, exclusive_maximum=True,
        help="How much of the old average survives each update; values nearer 1 follow training more slowly.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ema_device",
        kind="str",
        default="cpu",
        help="Where the averaged weights are stored between updates: cpu saves VRAM, accelerator updates faster.",
        group=_G,
        choices=("accelerator", "cpu"),
        implemented=True,
    ),
    Option(
        name="ema_cpu_only",
        kind="bool",
        default=False,
        help="Also run the EMA update on the CPU, so the averaged weights never travel to the GPU. No effect when ema_device is accelerator.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ema_update_interval",
        kind="int",
        default=1,
        minimum=1,
        help="Refresh the average only every N optimizer steps to reduce overhead.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ema_foreach_disable",
        kind="bool",
        default=False,
        help="Update the average tensor by tensor instead of with torch._foreach kernels, for backends where those misbehave.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="ema_validation",
        kind="str",
        default="comparison",
        help="Validation images from the live weights only (none), the averaged weights only (ema_only), or both (comparison).",
        group=_G,
        choices=("none", "ema_only", "comparison"),
        implemented=True,
    ),
]
