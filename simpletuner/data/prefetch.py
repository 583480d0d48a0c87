"""``--dataloader_prefetch``: a background thread prepares the next batches while the model trains.

The batch order must stay exactly the order of the synchronous path (same batches, same resume
points), so the thread runs the same two steps in the same sequence: *draw* (advance the seeded
sampler: which dataset, which records) and *load* (look up and stack tensors). Only the optimizer
step passed to a draw is unknown ahead of time, and a step changes a draw only through the set of
datasets active at it (``start_step`` / ``end_step``). Each prepared batch therefore records the
active set it assumed; when the trainer asks for a batch at a step whose active set differs, the
prepared batches are thrown away, the sampler is put back to the position after the last batch
handed out, and drawing resumes from there with the right step. Checkpoints save the position after
the last batch *handed out*, never the thread's read-ahead position.

The trainer's processes each take every N-th batch; the thread loads only the draws this process
keeps (from ``RANK`` / ``WORLD_SIZE``) and just draws the others, and a wrong guess only costs a
synchronous load.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from simpletuner.data.mixing import DatasetMixer, Draw

logger = logging.getLogger(__name__)

#: Seconds between checks of the stop flag while the queue is full.
_POLL_SECONDS = 0.05


@dataclass
class _Prepared:
    """One draw made ahead, with what it assumed and the sampler state right after it."""

    active: tuple[str, ...]
    draw: Draw | None
    state_after: dict[str, Any] | None
    batch: dict | None
    loaded: bool = False
    error: BaseException | None = None


class BatchPrefetcher:
    """Keeps up to ``depth`` batches ready; see the module docstring for the exactness argument.

    Args:
        mixer: the sampler shared with the synchronous path (only this object advances it while
            the thread runs).
        load: turns a draw into a batch; may encode on demand. Called only on the worker thread
            while it runs, so it needs no lock.
        on_draw: called with each draw in draw order (epoch bookkeeping), on the drawing thread.
        depth: ``--dataloader_prefetch_qlen``.
        rank / num_processes: which draws this process keeps.
    """

    def __init__(self, mixer: DatasetMixer, load: Callable[[Draw], dict], on_draw: Callable[[Draw], None],
                 depth: int, rank: int = 0, num_processes: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"dataloader_prefetch_qlen must be at least 1, got {depth}")
        self.mixer = mixer
        self.load = load
        self.on_draw = on_draw
        self.depth = depth
        self.rank = rank
        self.num_processes = max(1, num_processes)
        self._queue: queue.Queue[_Prepared] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._assumed_step = 0
        self._consumed_state = mixer.state_dict()

    # --- what TrainingData calls ------------------------------------------------------------------

    def next(self, step: int, keep: bool = True) -> dict | None:
        """The next batch at ``step`` (None when ``keep`` is False: the draw is skipped)."""
        if self._thread is None:
            self._start(step)
        self._assumed_step = step
        item = self._queue.get()
        if item.error is not None:
            self._halt()
            raise item.error
        if item.active != self.mixer.active_at(step):
            return self._resync(step, keep)
        self._consumed_state = item.state_after
        if not keep:
            return None
        return item.batch if item.loaded else self.load(item.draw)

    def state_dict(self) -> dict[str, Any]:
        """The sampler position after the last batch handed out."""
        return self._consumed_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stop reading ahead and continue from ``state``."""
        self._halt()
        self.mixer.load_state_dict(state)
        self._consumed_state = self.mixer.state_dict()

    def close(self) -> None:
        """Stop the thread and put the sampler back where the consumer is."""
        self._halt()

    # --- internals ---------------------------------------------------------------------------------

    def _start(self, step: int) -> None:
        self._assumed_step = step
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="simpletuner-prefetch", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        """Stop the thread, drop what it prepared and rewind the sampler to the consumer's position."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        while not self._queue.empty():
            self._queue.get_nowait()
        self.mixer.load_state_dict(self._consumed_state)

    def _resync(self, step: int, keep: bool) -> dict | None:
        """The active set changed at ``step``: redo this draw synchronously, then read ahead again."""
        self._halt()
        draw = self.mixer.next_draw(step)
        self.on_draw(draw)
        self._consumed_state = self.mixer.state_dict()
        batch = self.load(draw) if keep else None
        self._start(step)
        return batch

    def _keeps(self, draws_before: int) -> bool:
        return draws_before % self.num_processes == self.rank

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                step = self._assumed_step
                active = self.mixer.active_at(step)
                keep = self._keeps(self.mixer.draws)
                draw = self.mixer.next_draw(step)
                self.on_draw(draw)
                state = self.mixer.state_dict()
                batch = self.load(draw) if keep else None
                self._put(_Prepared(active, draw, state, batch, loaded=keep))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Prepared((), None, None, None, error=exc))

    def _put(self, item: _Prepared) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue
