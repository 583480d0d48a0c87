"""The training progress bar, whose rate and remaining time count training steps only.

tqdm measures its rate between two updates of the bar. A validation run (or a checkpoint, or an eval
pass) between two steps would count as part of the next step: right after a 15-second validation a
0.2-second step reads as ``15.2 s/it`` and the remaining time jumps up, then takes many steps to come
back. :func:`bar_paused` moves the bar's last-update mark forward by the time spent outside training,
so the next rate is the step's own. The elapsed time the bar shows stays the wall-clock time.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


def training_progress_bar(total: int, initial: int, enabled: bool, **tqdm_options):
    """The bar of the training loop (``tqdm_options`` reach tqdm, e.g. ``file`` or ``mininterval``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", disable=not enabled, dynamic_ncols=True,
                **tqdm_options)


def shift_bar_clock(progress, seconds: float) -> None:
    """Tell ``progress`` that ``seconds`` of the time since its last update were not spent on steps.

    tqdm's next update measures from ``last_print_t`` (the same mark its own ``unpause()`` moves);
    moving it forward by exactly the paused time keeps steps done but not yet shown in the measure.
    """
    if getattr(progress, "disable", True) or not hasattr(progress, "last_print_t"):
        return
    progress.last_print_t += seconds


@contextlib.contextmanager
def bar_paused(progress) -> Iterator[None]:
    """Work inside the block (validation, checkpoints, evaluation) does not count in the bar's rate."""
    started = time.perf_counter()
    try:
        yield
    finally:
        shift_bar_clock(progress, time.perf_counter() - started)
