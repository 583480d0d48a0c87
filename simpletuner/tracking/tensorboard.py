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

    def close(self) -> None:
        pass


class TensorboardTracker(NullTracker):
    """Scalars use hierarchical tags (``loss/train``, ``timing/sec_per_step``) so TensorBoard groups them."""

    def __init__(self, logging_dir: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.logging_dir = Path(logging_dir)
        self.writer = SummaryWriter(log_dir=str(self.logging_dir / run_name))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        array = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, array, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
