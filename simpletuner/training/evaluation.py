"""The evaluation loss: the training loss, without gradients, on held-out ``eval`` datasets.

When ``--eval_steps_interval`` / ``--eval_epoch_interval`` say so, every eval batch is scored at
``--eval_timesteps`` fixed, evenly spaced noise levels (DDPM timesteps or flow sigmas) with noise from
a generator seeded by (``--seed``, dataset id, batch index). The same weights therefore always give
the same eval loss, whichever process scores which batch, and the global random state (which an exact
resume depends on) is never touched.

Every process scores its share of the batches (batch ``i`` goes to process ``i mod N``); the sums and
image counts are averaged over processes with :func:`distributed.mean_over_processes`, so the result
is the mean over all eval images, as with one process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
from dataclasses import dataclass

import torch

from simpletuner.data.config import DatasetConfigError
from simpletuner.training import distributed

logger = logging.getLogger(__name__)

#: The pooled value's tracker key; per-dataset values are ``eval/loss/<dataset id>``.
POOLED_KEY = "eval/loss"
DEFAULT_EVAL_TIMESTEPS = 4


@dataclass
class EvalSchedule:
    """When the evaluation is due: every ``step_interval`` steps and/or every ``epoch_interval`` epochs
    (fractions allowed: 0.5 = twice per epoch). Both set: either one triggers, never twice on one step."""

    step_interval: int | None = None
    epoch_interval: float | None = None
    steps_per_epoch: int = 1

    def due(self, step: int) -> bool:
        if step <= 0:
            return False
        if self.step_interval and step % self.step_interval == 0:
            return True
        if self.epoch_interval:
            every = self.epoch_interval * self.steps_per_epoch  # in steps, maybe fractional
            # due at the first step at or past each multiple of `every`
            return math.floor(step / every + 1e-9) > math.floor((step - 1) / every + 1e-9)
        return False


def choose_datasets(eval_ids: list[str], wanted: str | None) -> list[str]:
    """The eval datasets to score: all of them, or only ``--eval_dataset_id``."""
    if wanted is None:
        return list(eval_ids)
    if wanted not in eval_ids:
        known = ", ".join(sorted(eval_ids)) or "none: add a dataset with \"dataset_type\": \"eval\""
        raise DatasetConfigError(f"`--eval_dataset_id {wanted}` is not an eval dataset of the dataset list; "
                                 f"eval dataset ids: {known}")
    return [wanted]


@contextlib.contextmanager
def eval_mode(*modules):
    """Modules (and their adapters, which are submodules) in eval mode; each submodule's own mode back after."""
    saved = [(module, module.training) for root in modules if root is not None for module in root.modules()]
    try:
        for root in modules:
            if root is not None:
                root.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


class EvalLoss:
    """Scores the eval datasets; ``run()`` returns the tracker scalars (the same on every process)."""

    def __init__(self, method, data, accelerator, dataset_ids: list[str], timesteps: int, seed: int | None,
                 pooled: bool, batch_size: int):
        self.method = method
        self.data = data
        self.accelerator = accelerator
        self.dataset_ids = dataset_ids
        self.positions = method.eval_positions(timesteps)
        self.seed = 0 if seed is None else int(seed)
        self.pooled = pooled
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config, method, data, accelerator) -> EvalLoss | None:
        """None unless an eval interval is set and the loss is not turned off."""
        if config.eval_loss_disable or not (config.eval_steps_interval or config.eval_epoch_interval):
            return None
        eval_ids = list(data.eval_datasets)
        if not eval_ids and config.evaluation_type == "clip":
            logger.info("no eval dataset in the dataset list: the evaluation computes the CLIP score only")
            return None
        if not eval_ids:
            raise DatasetConfigError("`--eval_steps_interval` / `--eval_epoch_interval` are set but the dataset list "
                                     "has no eval dataset; add an entry with \"dataset_type\": \"eval\" or unset them")
        return cls(method, data, accelerator, choose_datasets(eval_ids, config.eval_dataset_id),
                   config.eval_timesteps or DEFAULT_EVAL_TIMESTEPS, config.seed, bool(config.eval_dataset_pooling),
                   config.train_batch_size)

    def _generator(self, dataset_id: str, index: int, device: torch.device) -> torch.Generator:
        seed = (self.seed * 1_000_003 + zlib.crc32(dataset_id.encode()) * 7919 + index) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)

    def run(self, *modules) -> dict[str, float]:
        """The eval loss per dataset (and pooled), with ``modules`` (the denoiser, trained text encoders)
        in eval mode. To be called on every process."""
        accelerator = self.accelerator
        device = accelerator.device
        processes, rank = accelerator.num_processes, accelerator.process_index
        scalars: dict[str, float] = {}
        pooled_sum = pooled_count = 0.0
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(*modules), torch.no_grad():
            for dataset_id in self.dataset_ids:
                local_sum, local_count = 0.0, 0
                for index, batch in enumerate(self.data.eval_batches(dataset_id, self.batch_size)):
                    if index % processes != rank:
                        continue
                    loss = self.method.eval_loss(batch, device, self.positions,
                                                 self._generator(dataset_id, index, device))
                    size = batch["latent_mean"].shape[0]
                    local_sum += float(loss) * size
                    local_count += size
                total = distributed.mean_over_processes(accelerator, local_sum)
                count = distributed.mean_over_processes(accelerator, float(local_count))
                if count > 0:
                    scalars[f"{POOLED_KEY}/{dataset_id}"] = total / count
                    pooled_sum += total
                    pooled_count += count
        if self.pooled and pooled_count > 0:
            scalars[POOLED_KEY] = pooled_sum / pooled_count
        return scalars
