"""The resumable state of a run, one file per component, assembled from what the run registered.

Optimizer, LR schedule, EMA, sampler position, RNGs, the training method and each regularizer give
their state as a :class:`StatePart`; the trainer registers them once, the checkpoint writes every
registered part and resume restores every part from its own file, in registration order (RNGs are
registered last, so nothing draws a random number after they are restored). A new component adds a
part; neither the checkpoint writer nor the resume code changes.

``.pt`` parts are read back with :func:`simpletuner.training.checkpoint.load_state`, which refuses
pickled code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from simpletuner.training import checkpoint as ckpt


@dataclass(frozen=True)
class StatePart:
    """One component's state in a checkpoint: ``file`` inside the checkpoint folder, ``state()`` to
    save and ``restore(state)`` to load. ``.json`` files hold JSON, anything else a torch state file.

    ``optional``: a checkpoint without the file is resumed without restoring this part (EMA switched
    on for a run whose checkpoints had none starts from the current weights). ``skip_when_empty``: the
    file is only written while the component has state (SFT keeps none), and a missing file is then
    accepted only while the component still has nothing to restore.
    """

    file: str
    state: Callable[[], Any]
    restore: Callable[[Any], None]
    optional: bool = False
    skip_when_empty: bool = False

    def write(self, path: Path) -> None:
        if self.file.endswith(".json"):
            path.write_text(json.dumps(self.state()), encoding="utf-8")
        else:
            torch.save(self.state(), path)

    def read(self, folder: Path) -> None:
        path = folder / self.file
        if not path.exists():
            if self.optional or (self.skip_when_empty and not self.state()):
                return
            raise ckpt.CheckpointError(f"{folder} has no {self.file}, which this run needs to resume exactly; "
                                       "resume from a checkpoint written with the same options")
        if self.file.endswith(".json"):
            self.restore(json.loads(path.read_text(encoding="utf-8")))
        else:
            self.restore(ckpt.load_state(path))


class StateParts:
    """The registered parts of one run, in the order they are restored."""

    def __init__(self) -> None:
        self._parts: dict[str, StatePart] = {}

    def register(self, part: StatePart) -> None:
        if part.file in self._parts:
            raise ValueError(f"two components claim the checkpoint file {part.file!r}")
        self._parts[part.file] = part

    def files(self) -> list[str]:
        return list(self._parts)

    def writers(self) -> dict[str, Callable[[Path], None]]:
        """File name -> function writing it, for :func:`simpletuner.training.checkpoint.write_checkpoint`."""
        return {file: part.write for file, part in self._parts.items() if not (part.skip_when_empty and not part.state())}

    def restore(self, folder: Path) -> None:
        for part in self._parts.values():
            part.read(folder)
