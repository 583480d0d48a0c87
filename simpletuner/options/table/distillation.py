"""Few-step distillation."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "distillation"

OPTIONS: list[Option] = [
    Option(
        name="distillation_method",
        kind="str",
        default=None,
        help="Distillation technique to train a faster, few-step student; unset trains normally.",
        group=_G,
        choices=("lcm", "dcm", "dmd", "perflow"),
    ),
    Option(
        name="distillation_config",
        kind="json",
        default=None,
        help="JSON settings (inline or a file) for the chosen distillation method.",
        group=_G,
    ),
]
