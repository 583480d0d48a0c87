"""Opt-in data-pipeline diagnostics: ``--debug_aspect_buckets``, ``--debug_dataset_loader`` and
``--print_sampler_statistics``.

All three log at INFO (they are switched on explicitly, so they should show without changing the log
level) under the ``simpletuner.data.debug`` logger. Nothing here changes what is trained on.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path

logger = logging.getLogger(__name__)

#: File names shown per bucket by ``--debug_aspect_buckets``.
EXAMPLES_PER_BUCKET = 3


def _label(size) -> str:
    return "x".join(str(int(value)) for value in size)


def bucket_of_paths(data) -> dict[tuple[str, str], tuple]:
    """(dataset id, path) -> the bucket that image is trained at."""
    return {(record.dataset_id, str(record.path)): size for record, size in data.bucket_of.items()}


def log_aspect_buckets(data) -> None:
    """Every bucket of every training dataset: its image count and a few of its file names."""
    grouped: dict[str, dict[tuple, list[str]]] = defaultdict(lambda: defaultdict(list))
    for record, size in data.bucket_of.items():
        grouped[record.dataset_id][tuple(size)].append(Path(record.path).name)
    samplers = getattr(data.sampler, "samplers", {})
    for dataset_id in sorted(grouped):
        buckets = grouped[dataset_id]
        sampler = samplers.get(dataset_id)
        batches = sampler.batches_per_epoch() if sampler is not None else 0
        logger.info("aspect buckets of dataset %s: %d buckets, %d images, %d batches per epoch", dataset_id,
                    len(buckets), sum(len(names) for names in buckets.values()), batches)
        for size in sorted(buckets):
            names = sorted(buckets[size])
            more = f" (+{len(names) - EXAMPLES_PER_BUCKET} more)" if len(names) > EXAMPLES_PER_BUCKET else ""
            logger.info("  dataset %s bucket %s: %d images, e.g. %s%s", dataset_id, _label(size), len(names),
                        ", ".join(names[:EXAMPLES_PER_BUCKET]), more)
        if sampler is not None and sampler.dropped_records():
            logger.info("  dataset %s: %d images are in buckets too small for one batch and are never used",
                        dataset_id, sampler.dropped_records())


class BatchInspector:
    """Logs each drawn batch (``--debug_dataset_loader``) and counts samples per dataset and bucket
    (``--print_sampler_statistics``), per epoch and for the whole run."""

    def __init__(self, data, log_batches: bool, statistics: bool):
        self.log_batches = log_batches
        self.statistics = statistics
        self._bucket_of = bucket_of_paths(data) if (log_batches or statistics) else {}
        self.epoch_counts: Counter = Counter()
        self.run_counts: Counter = Counter()

    @property
    def active(self) -> bool:
        return self.log_batches or self.statistics

    def bucket(self, dataset_id: str, path: str) -> str:
        size = self._bucket_of.get((dataset_id, str(path)))
        return _label(size) if size is not None else "?"

    def observe(self, batch: dict, step: int) -> None:
        """``step``: the optimizer step this batch is for (1-based)."""
        if not self.active:
            return
        dataset_id = batch.get("dataset_id", "?")
        paths = list(batch.get("paths", []))
        bucket = self.bucket(dataset_id, paths[0]) if paths else "?"
        if self.log_batches:
            logger.info("step %d batch: dataset %s, bucket %s, %d files: %s", step, dataset_id, bucket, len(paths),
                        ", ".join(Path(p).name for p in paths))
        if self.statistics:
            self.epoch_counts[(dataset_id, bucket)] += len(paths)
            self.run_counts[(dataset_id, bucket)] += len(paths)

    def end_epoch(self, epoch: int) -> None:
        if self.statistics and self.epoch_counts:
            self._report(f"epoch {epoch}", self.epoch_counts)
        self.epoch_counts = Counter()

    def end_run(self) -> None:
        if self.statistics and self.run_counts:
            self._report("whole run", self.run_counts)

    @staticmethod
    def _report(title: str, counts: Counter) -> None:
        per_dataset: Counter = Counter()
        for (dataset_id, _), count in counts.items():
            per_dataset[dataset_id] += count
        lines = [f"sampler statistics ({title}): {sum(counts.values())} samples"]
        for dataset_id in sorted(per_dataset):
            lines.append(f"  dataset {dataset_id}: {per_dataset[dataset_id]} samples")
            for (owner, bucket), count in sorted(counts.items()):
                if owner == dataset_id:
                    lines.append(f"    bucket {bucket}: {count}")
        logger.info("\n".join(lines))
