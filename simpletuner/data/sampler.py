"""Bucketed, resumable batch order.

Every batch comes from one aspect bucket, so its images share a tensor shape. The order is a pure
function of (seed, epoch): a resumed run rebuilds the epoch's plan and continues at the saved
position, yielding exactly the batches the uninterrupted run would have (the "resume is exact"
contract; compare edm2's ``InfiniteSampler(start_idx=...)``).

``random.Random`` is used rather than torch so the order does not depend on, or disturb, torch's
global RNG state, and so this module imports without torch.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator

from simpletuner.data.metadata import ImageRecord

Bucket = tuple[int, int]


class BucketBatchSampler:
    """Infinite iterator of single-bucket batches, epoch after epoch.

    Per epoch, each record appears ``1 + repeats[dataset_id]`` times. Within each bucket the
    copies are shuffled (seeded by seed, epoch and bucket) and split into batches of
    ``batch_size``; then the order of all batches is shuffled (seeded by seed and epoch). With
    repeats, two copies of one image may land in the same batch; this is accepted, as in the
    original trainer.

    With ``drop_last`` the incomplete tail of each bucket is left out of that epoch (a different
    tail each epoch, because of the shuffle), and a bucket holding fewer than ``batch_size``
    copies is never used at all: :meth:`dropped_records` counts those images so the caller can
    report them. Without ``drop_last`` the tail forms a smaller batch. With ``keep_small_buckets``
    (``--disable_bucket_pruning``) a bucket holding fewer copies than ``batch_size`` is not left out:
    its shuffled copies are repeated, in order, to fill one full batch per epoch (a batch keeps its
    shape, at the price of showing those images more often).

    Attributes:
        epoch: the epoch being iterated (0-based).
        position: batches already yielded in ``epoch``.
        seed: the shuffle seed.
    """

    def __init__(
        self,
        buckets: dict[Bucket, list[ImageRecord]],
        batch_size: int,
        seed: int,
        repeats: dict[str, int] | None = None,
        drop_last: bool = True,
        keep_small_buckets: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        repeats = dict(repeats or {})
        negative = {name: count for name, count in repeats.items() if count < 0}
        if negative:
            raise ValueError(f"repeats must be 0 or more, got {negative}")
        # Sorted so the plan does not depend on the caller's dict insertion order.
        self._buckets = {size: list(buckets[size]) for size in sorted(buckets) if buckets[size]}
        self._repeats = repeats
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.keep_small_buckets = keep_small_buckets
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._plan_epoch: int | None = None
        self._plan: list[list[ImageRecord]] = []
        self._batches_per_epoch = self._count_batches()
        if self._batches_per_epoch == 0:
            raise ValueError(
                f"no batch can be formed: every bucket holds fewer than batch_size={batch_size} images "
                f"({self.dropped_records()} images unused); lower batch_size, add images, or set drop_last=False"
            )

    @property
    def bucket_sizes(self) -> list[tuple[int, int]]:
        """The (width, height) of every bucket that has records."""
        return list(self._buckets)

    def batches_per_epoch(self) -> int:
        """Number of batches in every epoch (the same for all epochs)."""
        return self._batches_per_epoch

    def _count_batches(self) -> int:
        """Batches per epoch from bucket sizes and repeats (computed once: both are fixed)."""
        total = 0
        for records in self._buckets.values():
            copies = self._copies_in(records)
            if self.keep_small_buckets and 0 < copies < self.batch_size:
                total += 1
            else:
                total += copies // self.batch_size if self.drop_last else math.ceil(copies / self.batch_size)
        return total

    def dropped_records(self) -> int:
        """Images never trained on: those in buckets with fewer than ``batch_size`` copies (drop_last)."""
        if not self.drop_last or self.keep_small_buckets:
            return 0
        return sum(len(records) for records in self._buckets.values() if self._copies_in(records) < self.batch_size)

    @property
    def epoch_of_next_batch(self) -> int:
        """The epoch the next yielded batch belongs to (``epoch + 1`` once this epoch is exhausted)."""
        return self.epoch + 1 if self.position >= self.batches_per_epoch() else self.epoch

    def __iter__(self) -> Iterator[list[ImageRecord]]:
        """Yield batches forever, continuing from ``epoch`` / ``position``.

        State is advanced before each yield, so a :meth:`state_dict` taken after receiving N
        batches resumes at batch N + 1. Use one live iterator at a time: they share the state.
        """
        while True:
            plan = self._epoch_plan(self.epoch)
            while self.position < len(plan):
                batch = plan[self.position]
                self.position += 1
                yield list(batch)
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs to continue the exact batch order."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the batch after the one last yielded when ``state`` was taken.

        The saved seed replaces the constructor's, because the data order of a resumed run must
        match the interrupted one (like every other RNG restored from the checkpoint).
        """
        missing = [key for key in ("epoch", "position", "seed") if key not in state]
        if missing:
            raise ValueError(f"sampler state is missing {missing}; it was not written by BucketBatchSampler.state_dict")
        if state["epoch"] < 0 or state["position"] < 0:
            raise ValueError(f"sampler state has negative epoch/position: {dict(state)}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._plan_epoch = None

    def _copies_in(self, records: list[ImageRecord]) -> int:
        """How many samples a bucket contributes per epoch, counting repeats."""
        return sum(1 + self._repeats.get(record.dataset_id, 0) for record in records)

    def _epoch_plan(self, epoch: int) -> list[list[ImageRecord]]:
        """All batches of ``epoch`` in order; cached, since it is rebuilt only once per epoch."""
        if self._plan_epoch != epoch:
            self._plan = self._build_plan(epoch)
            self._plan_epoch = epoch
        return self._plan

    def _build_plan(self, epoch: int) -> list[list[ImageRecord]]:
        """Shuffle within buckets, cut into batches, then shuffle the batch order.

        Each bucket has its own generator (seed, epoch, bucket) so adding a bucket does not change
        the order inside the others. String seeds are hashed with SHA-512 by ``random.Random``,
        independent of ``PYTHONHASHSEED``.
        """
        batches: list[list[ImageRecord]] = []
        for size, records in self._buckets.items():
            copies = [
                record for record in records for _ in range(1 + self._repeats.get(record.dataset_id, 0))
            ]
            # "WxH" (or "WxHxF" for a video bucket): the seed image buckets have always used
            label = "x".join(str(value) for value in size)
            random.Random(f"bucket-sampler:{self.seed}:{epoch}:{label}").shuffle(copies)
            batches.extend(self._split(copies))
        random.Random(f"bucket-sampler:{self.seed}:{epoch}:order").shuffle(batches)
        return batches

    def _split(self, copies: list[ImageRecord]) -> list[list[ImageRecord]]:
        """Cut one bucket's shuffled copies into batches, dropping the tail when ``drop_last``."""
        if self.keep_small_buckets and 0 < len(copies) < self.batch_size:
            return [[copies[index % len(copies)] for index in range(self.batch_size)]]
        batches = [copies[start : start + self.batch_size] for start in range(0, len(copies), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches
