"""Conditioning datasets: masks and control images paired to training images by relative path.

An image dataset lists ``conditioning_data`` (one id or several); each named dataset has
``"dataset_type": "conditioning"`` and a ``conditioning_type``. The conditioning file of
``sub/cat.jpg`` is ``sub/cat.jpg`` in the conditioning dataset, or failing that a file with the same
path and stem and another image extension (``sub/cat.png``: masks are usually PNG). A training image
without its conditioning file in every paired dataset is left out, with the reason in the summary:
training an inpainting or control model on an image without its condition would teach it to ignore it.

Each conditioning image is resized and cropped with the paired image's crop box
(:func:`simpletuner.data.images.load_conditioning_tensor`) and cached as uint8 (``C, H, W``) beside
the latents, keyed by its content, the box, and the paired image's size. Batches get:

* ``mask``: float (B, 1, H, W) in [0, 1] at the image's pixel size (conditioning_type ``mask``);
* ``conditioning_pixels``: float (B, 3, H, W) in [-1, 1] (``controlnet``, ``reference_*``);
* ``conditioning``: one dict per paired dataset (``dataset_id``, ``conditioning_type`` and its
  ``mask`` or ``pixels``) with ``--conditioning_multidataset_sampling combined`` (the default);
  with ``random`` each sample takes one paired dataset, chosen from (seed, epoch, path), and
  ``conditioning_dataset_ids`` says which.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import torch
from tqdm.auto import tqdm

from simpletuner.data.backends import Backend
from simpletuner.data.cache.store import LocalEntries, BackendEntries, TensorMemory, fingerprint
from simpletuner.data.cache.vae import ContentIndex
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.images import CorruptImageError, load_conditioning_tensor
from simpletuner.data.metadata import IMAGE_EXTENSIONS, ImageRecord
from simpletuner.data.parallel import ordered_map

logger = logging.getLogger(__name__)

Size = tuple[int, int]
Anchor = tuple[float, float]
CONDITIONING_SAMPLING = ("combined", "random")


def pair_keys(image_keys: list[str], conditioning_keys: list[str]) -> dict[str, str]:
    """For each image key, its conditioning key: the same path, else the same path and stem with
    another image extension (the first in sorted order, so the choice is stable)."""
    available = set(conditioning_keys)
    by_stem: dict[str, str] = {}
    for key in sorted(conditioning_keys):
        by_stem.setdefault(PurePosixPath(key).with_suffix("").as_posix(), key)
    pairs = {}
    for key in image_keys:
        if key in available:
            pairs[key] = key
        else:
            match = by_stem.get(PurePosixPath(key).with_suffix("").as_posix())
            if match is not None:
                pairs[key] = match
    return pairs


@dataclass
class ConditioningSet:
    """One conditioning dataset as used by one run: its files, cache and pairs.

    Attributes:
        cfg: the conditioning dataset's entry (globals resolved).
        images: where its files are.
        keys: its image files.
        pairs: paired training image path -> conditioning key.
        is_main_process: this process writes the shared content index (rank 0 under a launcher).
    """

    cfg: ImageDatasetConfig
    images: Backend
    keys: list[str]
    entries: LocalEntries | BackendEntries
    memory: TensorMemory
    workers: int = 1
    write: bool = True
    pairs: dict = field(default_factory=dict)
    is_main_process: bool = True

    def __post_init__(self) -> None:
        self.index = ContentIndex(self.entries, self.images, writes=self.is_main_process)
        self._content: dict[str, str] = {}
        self._bad: set = set()

    @property
    def id(self) -> str:
        return self.cfg.id

    @property
    def is_mask(self) -> bool:
        return self.cfg.conditioning_type == "mask"

    def pair(self, records: list[ImageRecord]) -> list[tuple[ImageRecord, str]]:
        """Pair ``records`` (of one training dataset) with this dataset's files; returns the
        records left without a conditioning file, with the reason."""
        found = pair_keys([r.key for r in records if r.key is not None], self.keys)
        missing = []
        for record in records:
            key = found.get(record.key) if record.key is not None else None
            if key is None:
                missing.append((record, f"no conditioning image for {record.key or record.path} in conditioning "
                                        f"dataset {self.id!r} (same relative path, any image extension)"))
            else:
                self.pairs[record.path] = key
        return missing

    def ensure(self, jobs: list[tuple[ImageRecord, Size, Anchor]], progress: bool) -> list[tuple[ImageRecord, str]]:
        """Cache every job's tensor now; returns the records whose conditioning image cannot be used."""
        failed = []
        todo = []
        for record, size, anchor in jobs:
            key = self._key(record, size, anchor)
            if key is None:
                failed.append((record, f"conditioning image of {record.path} cannot be read"))
            elif self.memory.get(key) is None and (not self.write or self.entries.read(key) is None):
                todo.append((record, size, anchor, key))
        self.index.save()
        results = ordered_map(lambda job: (job, self._make(*job[:3])), todo, self.workers, 4 * self.workers)
        with tqdm(total=len(todo), desc=f"caching conditioning {self.id}", unit="img",
                  disable=not progress or not todo) as bar:
            for (record, _, _, key), tensor in results:
                if isinstance(tensor, CorruptImageError):
                    failed.append((record, f"conditioning image: {tensor}"))
                else:
                    self._store(key, tensor, record)
                bar.update(1)
        return failed

    def load(self, record: ImageRecord, size: Size, anchor: Anchor) -> torch.Tensor | None:
        """The uint8 conditioning tensor of ``record`` for this crop (made now if not cached);
        None when the conditioning image cannot be decoded."""
        if record.path in self._bad:
            return None
        key = self._key(record, size, anchor)
        if key is None:
            return None
        tensors = self.memory.get(key) or (self.entries.read(key) if self.write else None)
        if tensors is None:
            tensor = self._make(record, size, anchor)
            if isinstance(tensor, CorruptImageError):
                logger.warning("dataset %s: conditioning image of %s cannot be used: %s", self.id, record.path, tensor)
                self._bad.add(record.path)
                return None
            return self._store(key, tensor, record)
        self.memory.put(key, tensors)
        return tensors["conditioning"]

    def _key(self, record: ImageRecord, size: Size, anchor: Anchor) -> str | None:
        cond_key = self.pairs[record.path]
        content = self._content.get(cond_key)
        if content is None:
            try:
                content = self.index.content_hash(cond_key)
            except OSError:
                return None
            self._content[cond_key] = content
        return fingerprint(kind="conditioning", mask=self.is_mask, content_sha256=content, size=list(size),
                           anchor=list(anchor), reference=[record.width, record.height])

    def _make(self, record: ImageRecord, size: Size, anchor: Anchor) -> torch.Tensor | CorruptImageError:
        cond_key = self.pairs[record.path]
        local = self.images.local_path(cond_key)
        try:
            source = local if local is not None else self.images.read_bytes(cond_key)
            return load_conditioning_tensor(source, size, anchor, (record.width, record.height), self.is_mask,
                                            name=str(self.images.locate(cond_key)))
        except (CorruptImageError, FileNotFoundError) as exc:
            return exc if isinstance(exc, CorruptImageError) else CorruptImageError(str(exc))

    def _store(self, key: str, tensor: torch.Tensor, record: ImageRecord) -> torch.Tensor:
        tensors = {"conditioning": tensor}
        if self.write:
            self.entries.write(key, tensors, {"fingerprint": key, "source": str(record.path)})
            self.memory.put(key, tensors)
        return tensor


def list_conditioning_files(images: Backend) -> list[str]:
    """Every image file of a conditioning dataset."""
    return images.list_files(IMAGE_EXTENSIONS)


def conditioning_batch(sets: list[ConditioningSet], records: list[ImageRecord], size: Size, anchors: list[Anchor],
                       sampling: str, seed: int, epoch: int) -> tuple[dict, list[int]]:
    """The conditioning keys of one batch (see the module docstring) and the indices of records
    to drop because a conditioning image could not be decoded."""
    if sampling not in CONDITIONING_SAMPLING:
        raise ValueError(f"unknown conditioning_multidataset_sampling {sampling!r}; use one of {CONDITIONING_SAMPLING}")
    if sampling == "random" and len(sets) > 1:
        chosen = [sets[random.Random(f"conditioning:{seed}:{epoch}:{r.path}").randrange(len(sets))] for r in records]
        tensors = [chosen[i].load(r, size, anchors[i]) for i, r in enumerate(records)]
        dropped = [i for i, t in enumerate(tensors) if t is None]
        kept = [t for t in tensors if t is not None]
        batch: dict = {"conditioning_dataset_ids": [chosen[i].id for i in range(len(records)) if i not in dropped]}
        if kept:
            batch.update(_top_level(chosen[0].is_mask, torch.stack(kept)))
        return batch, dropped
    per_set = [[cond.load(r, size, anchors[i]) for i, r in enumerate(records)] for cond in sets]
    dropped = sorted({i for tensors in per_set for i, t in enumerate(tensors) if t is None})
    entries = []
    batch = {}
    for cond, tensors in zip(sets, per_set):
        kept = [t for i, t in enumerate(tensors) if i not in dropped]
        if not kept:
            continue
        converted = _top_level(cond.is_mask, torch.stack(kept))
        name = "mask" if cond.is_mask else "conditioning_pixels"
        entries.append({"dataset_id": cond.id, "conditioning_type": cond.cfg.conditioning_type,
                        ("mask" if cond.is_mask else "pixels"): converted[name]})
        batch.setdefault(name, converted[name])
    batch["conditioning"] = entries
    return batch, dropped


def _top_level(is_mask: bool, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 (B, C, H, W) as ``mask`` in [0, 1] or ``conditioning_pixels`` in [-1, 1]."""
    if is_mask:
        return {"mask": stacked.float() / 255.0}
    return {"conditioning_pixels": stacked.float() / 127.5 - 1.0}
