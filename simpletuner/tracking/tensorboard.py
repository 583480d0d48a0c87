"""TensorBoard event files, written with torch's SummaryWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class NullTracker:
    """Accepts everything, writes nothing."""

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def log_image(self, tag: str, image, step: int) -> None:
        pass

    def continue_from(self, step: int) -> None:
        """The run resumed at ``step`` (called before anything is logged)."""

    def close(self) -> None:
        pass


class TensorboardTracker(NullTracker):
    """Scalars use hierarchical tags (``loss/train``, ``timing/sec_per_step``) so TensorBoard groups them.

    A resumed run writes into the same run folder as before. The event file is only opened at the
    first value, with ``purge_step`` one past the resumed step: TensorBoard then hides what the
    interrupted run had logged after its last checkpoint, and the curves continue as one run instead
    of folding back on themselves.
    """

    def __init__(self, logging_dir: Path, run_name: str):
        self.logging_dir = Path(logging_dir)
        self.run_folder = self.logging_dir / run_name
        self.purge_step: int | None = None
        self._writer = None

    def continue_from(self, step: int) -> None:
        if self._writer is not None:
            raise RuntimeError("continue_from() must come before the first logged value")
        self.purge_step = step + 1

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_folder), purge_step=self.purge_step)
        return self._writer

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        array = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, array, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
