"""Mixing several datasets: which dataset each batch comes from.

Every dataset keeps its own :class:`~simpletuner.data.sampler.BucketBatchSampler` (so a batch never
mixes datasets, and each dataset cycles through its own epochs). Before each batch a dataset is drawn
with probability proportional to its weight, among the datasets active at the current step
(``start_step`` <= step < ``end_step``):

- ``auto-weighting`` (default): weight = ``probability`` x images x (1 + ``repeats``), so a large
  dataset is not exhausted ten times slower than a small one unless you ask for it;
- ``uniform``: weight = ``probability`` alone.

Regularisation (prior-preservation) datasets are drawn the same way; because a batch never mixes
datasets, the loss side (methods/prior_preservation.py) can weight and retarget whole batches.

Draw number ``n`` uses its own generator seeded by (seed, n), so the choice sequence is a pure
function of the seed and resuming only needs the draw counter. This module imports without torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

from simpletuner.data.metadata import ImageRecord
from simpletuner.data.sampler import BucketBatchSampler

SAMPLING_MODES = ("auto-weighting", "uniform")


@dataclass(frozen=True)
class DatasetSchedule:
    """How often and when one dataset is drawn."""

    weight: float
    start_step: int = 0
    end_step: int | None = None

    def active_at(self, step: int) -> bool:
        return self.weight > 0 and step >= self.start_step and (self.end_step is None or step < self.end_step)


def dataset_weight(mode: str, probability: float, images: int, repeats: int) -> float:
    """The draw weight of one dataset under ``--data_backend_sampling``."""
    if mode == "uniform":
        return probability
    if mode == "auto-weighting":
        return probability * images * (1 + repeats)
    raise ValueError(f"unknown data_backend_sampling {mode!r}; use one of {SAMPLING_MODES}")


class Draw(NamedTuple):
    """One batch of records, the dataset it came from and that dataset's epoch."""

    dataset_id: str
    records: list[ImageRecord]
    epoch: int


class DatasetMixer:
    """Draws a dataset per batch and returns that dataset's next batch."""

    def __init__(self, samplers: dict[str, BucketBatchSampler], schedules: dict[str, DatasetSchedule], seed: int):
        if set(samplers) != set(schedules):
            raise ValueError("every dataset needs both a sampler and a schedule")
        self.samplers = samplers
        self.schedules = schedules
        self.seed = seed
        self.draws = 0
        self._iterators: dict[str, Iterator[list[ImageRecord]]] = {}

    @property
    def bucket_sizes(self) -> list[tuple[int, int]]:
        return sorted({size for sampler in self.samplers.values() for size in sampler.bucket_sizes})

    def batches_per_epoch(self) -> int:
        """Batches in one pass over every dataset (what "an epoch" means with several datasets)."""
        return sum(sampler.batches_per_epoch() for sampler in self.samplers.values())

    def active_at(self, step: int) -> tuple[str, ...]:
        """The datasets that may be drawn at ``step``: the only way ``step`` changes a draw."""
        return tuple(name for name, schedule in self.schedules.items() if schedule.active_at(step))

    def choose(self, step: int) -> str:
        """The dataset the next batch comes from."""
        active = list(self.active_at(step))
        if not active:
            windows = ", ".join(f"{n}: steps {s.start_step}..{s.end_step if s.end_step is not None else 'end'}"
                                for n, s in self.schedules.items())
            raise RuntimeError(f"no dataset is active at step {step} ({windows}); adjust start_step/end_step")
        generator = random.Random(f"dataset-mixer:{self.seed}:{self.draws}")
        self.draws += 1
        return generator.choices(active, weights=[self.schedules[name].weight for name in active])[0]

    def next_batch(self, step: int) -> list[ImageRecord]:
        return self.next_draw(step).records

    def next_draw(self, step: int) -> Draw:
        """The next batch with its dataset and epoch (the sampler's epoch while it yields)."""
        name = self.choose(step)
        if name not in self._iterators:
            self._iterators[name] = iter(self.samplers[name])
        records = next(self._iterators[name])
        return Draw(name, records, self.samplers[name].epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "datasets": {name: s.state_dict() for name, s in self.samplers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state.get("datasets", {})) - set(self.samplers)
        missing = set(self.samplers) - set(state.get("datasets", {}))
        if "draws" not in state or unknown or missing:
            raise ValueError(
                "the checkpoint's data position does not match the configured datasets "
                f"(unknown: {sorted(unknown)}, missing: {sorted(missing)}); resume with the same multidatabackend.json"
            )
        self.draws = int(state["draws"])
        for name, sampler_state in state["datasets"].items():
            self.samplers[name].load_state_dict(sampler_state)
        self._iterators.clear()
