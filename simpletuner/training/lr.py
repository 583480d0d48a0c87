"""Learning-rate schedules, built with diffusers' scheduler factory (warmup included)."""

from __future__ import annotations

import torch

SCHEDULES = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial", "sine")


def sine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, cycles: int = 1):
    """Linear warmup, then a quarter sine wave from the full rate down to 0, ``cycles`` times.

    ``sin(pi/2 * (1 - p))`` stays near the full rate longer than cosine and falls faster at the end
    of each cycle; ``p`` is the progress within the current cycle.
    """
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        within = (progress * cycles) % 1.0
        return math.sin(math.pi / 2 * (1 - within))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_lr_scheduler(config, optimizer: torch.optim.Optimizer, total_steps: int):
    """The ``--lr_scheduler`` schedule over ``total_steps`` optimizer steps.

    ``constant`` ignores warmup (as its name says); use ``constant_with_warmup`` to ramp up.
    ``polynomial`` decays to ``--lr_end`` with exponent ``--lr_power``; ``cosine_with_restarts`` and
    ``sine`` repeat ``--lr_num_cycles`` times (hard restarts).
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
    cycles = config.lr_num_cycles or 1
    if config.lr_scheduler == "sine":
        return sine_schedule(optimizer, warmup, total_steps, cycles)
    return get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, num_cycles=cycles)
