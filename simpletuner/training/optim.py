"""Optimizers by name. Each comes from its own package; nothing is re-implemented here.

``adamw_bf16`` is AdamW that stays correct when the trained weights are bfloat16: torch-optimi's
AdamW with Kahan-compensated summation, so tiny updates are not rounded away. On float32 weights it
is ordinary AdamW.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def _optimi_adamw(params, config, kahan: bool | None):
    import optimi

    return optimi.AdamW(
        params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, kahan_sum=kahan,
    )


OPTIMIZERS: dict[str, Callable] = {
    "adamw_bf16": lambda params, config: _optimi_adamw(params, config, kahan=True),
    "optimi-adamw": lambda params, config: _optimi_adamw(params, config, kahan=None),
}


def build_optimizer(config, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by ``--optimizer`` over ``parameters``."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {config.optimizer!r} is not available; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[config.optimizer](list(parameters), config)
