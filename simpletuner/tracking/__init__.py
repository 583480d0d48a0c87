"""Where metrics and images go: accelerate's trackers (tensorboard, wandb, comet_ml), or nowhere
(``--report_to none``); see :mod:`simpletuner.tracking.trackers`. Webhooks live in ``webhooks.py``."""

from __future__ import annotations

from pathlib import Path


def build_tracker(accelerator, config, output_dir: Path, is_main_process: bool, config_file: Path | None = None):
    """The trackers named by ``--report_to`` on the main process; other processes never write."""
    from simpletuner.tracking.trackers import build_tracker as build

    return build(accelerator, config, output_dir, is_main_process, config_file)
