"""Where metrics and images go: tensorboard, or nowhere (``--report_to none``)."""

from __future__ import annotations

from pathlib import Path


def build_tracker(config, output_dir: Path, is_main_process: bool):
    """The tracker named by ``--report_to``; non-main processes never write."""
    from simpletuner.tracking.tensorboard import NullTracker, TensorboardTracker

    if not is_main_process or config.report_to == "none":
        return NullTracker()
    logging_dir = Path(config.logging_dir or "logs")
    if not logging_dir.is_absolute():
        logging_dir = output_dir / logging_dir
    return TensorboardTracker(logging_dir / config.tracker_project_name, run_name=config.tracker_run_name)
