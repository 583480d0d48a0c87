"""Every option the trainer accepts, declared once per group module.

``ALL_OPTIONS`` is the concatenation of the group modules in a fixed order; that order is the order
used by ``--help`` and the generated documentation. This package only declares data: it must stay
free of heavy imports so the CLI can start quickly.
"""

from __future__ import annotations

from simpletuner.options.spec import Option
from simpletuner.options.table import (
    adapters,
    checkpointing,
    data,
    distillation,
    ema,
    logging,
    memory,
    model,
    optimizer,
    performance,
    precision,
    publishing,
    regularizers,
    training,
    validation,
)

ALL_OPTIONS: list[Option] = [
    *model.OPTIONS,
    *adapters.OPTIONS,
    *precision.OPTIONS,
    *memory.OPTIONS,
    *data.OPTIONS,
    *training.OPTIONS,
    *optimizer.OPTIONS,
    *ema.OPTIONS,
    *checkpointing.OPTIONS,
    *validation.OPTIONS,
    *regularizers.OPTIONS,
    *distillation.OPTIONS,
    *logging.OPTIONS,
    *publishing.OPTIONS,
    *performance.OPTIONS,
]

__all__ = ["ALL_OPTIONS"]
