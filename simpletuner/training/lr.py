"""Learning-rate schedules, built with diffusers' scheduler factory (warmup included)."""

from __future__ import annotations

import torch

SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial")


def build_lr_scheduler(config, optimizer: torch.optim.Optimizer, total_steps: int):
    """The ``--lr_scheduler`` schedule over ``total_steps`` optimizer steps.

    ``constant`` ignores warmup (as its name says); use ``constant_with_warmup`` to ramp up.
    ``polynomial`` decays to ``--lr_end`` with exponent ``--lr_power``.
    """
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    if config.lr_scheduler not in SCHEDULES:
        raise ValueError(f"lr_scheduler {config.lr_scheduler!r} is not available; choose one of {SCHEDULES}")
    warmup = config.lr_warmup_steps or 0
    if config.lr_scheduler == "polynomial":
        # get_scheduler() does not forward lr_end, so build this one directly.
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
            lr_end=config.lr_end, power=config.lr_power,
        )
    return get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)
