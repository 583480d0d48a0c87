"""The run's experiment trackers, driven through accelerate's tracker layer.

accelerate owns the trackers (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``get_tracker``); this module decides which ones a config asks for, what each is told at start
(project, run name, where it writes, the redacted config) and how validation images and videos reach
the ones that show them. Scalars go through ``accelerator.log`` unchanged, so every loss term keeps
the name the trainer gives it (``loss/train``, ``loss/<term>``, ``eval/...``).

Only the main process writes: the trainer hands other processes a :class:`NullTracker`, and accelerate's
``log`` is a no-op there anyway.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The trackers ``--report_to`` can name; ``all`` means every one of them that is installed.
TRACKER_NAMES = ("tensorboard", "wandb", "comet_ml")
#: The package each tracker imports.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}
#: What to install for each: tensorboard and wandb are dependencies; comet_ml is optional (not in the lock,
#: which holds only what the suite runs), and accelerate's CometMLTracker needs ``comet_ml.start`` (3.41).
TRACKER_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml>=3.41"}


def tracker_is_installed(name: str) -> bool:
    """Whether the tracker's package can be imported (checked without importing it: wandb is slow to load)."""
    return importlib.util.find_spec(TRACKER_PACKAGES[name]) is not None


def report_to_names(report_to: str | None) -> list[str]:
    """The names ``--report_to`` holds, in order, without repeats: ``tensorboard,wandb`` names two."""
    return list(dict.fromkeys(part.strip() for part in str(report_to or "").split(",") if part.strip()))


def requested_trackers(report_to: str | None) -> list[str]:
    """The trackers ``--report_to`` names: none for ``none``, every installed one for ``all``, else each
    comma-separated name (validation already refused unknown names and ``all``/``none`` in a list)."""
    names = report_to_names(report_to)
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [name for name in TRACKER_NAMES if tracker_is_installed(name)]
    return names


def logging_folder(config, output_dir: Path) -> Path:
    """``--logging_dir``, relative to ``output_dir`` unless absolute."""
    folder = Path(config.logging_dir or "logs").expanduser()
    return folder if folder.is_absolute() else Path(output_dir) / folder


def accelerator_tracking_arguments(config, output_dir: Path) -> dict[str, Any]:
    """The ``Accelerator(...)`` keywords that set the trackers up: ``log_with`` and the project folders.

    TensorBoard is handed over as accelerate's own ``TensorBoardTracker``, built here, because its event
    files go to ``<logging_dir>/<project>/<run>`` (the folder ``--overwrite_output_dir`` sets aside and a
    resumed run continues) while accelerate would name the folder after the project alone. wandb and
    comet are named by string and built by ``init_trackers``.
    """
    from accelerate.utils import ProjectConfiguration

    folder = logging_folder(config, output_dir)
    log_with: list = []
    for name in requested_trackers(config.report_to):
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            log_with.append(TensorBoardTracker(config.tracker_run_name, folder / config.tracker_project_name))
        else:
            log_with.append(name)
    return {"log_with": log_with or None,
            "project_config": ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(folder))}


def tracker_config(config, config_file: Path | None = None) -> dict[str, Any]:
    """The resolved config as trackers show it: secrets redacted, and every value a scalar or a string.

    TensorBoard's hparams and comet's parameters only take scalars, so lists and dicts are shown as
    JSON and an unset value as an empty string (wandb gets the same, so all trackers agree).
    """
    from simpletuner.options.secrets import redacted_config

    resolved = redacted_config({"config_file": str(config_file) if config_file else None, **config.as_dict()})
    flat: dict[str, Any] = {}
    for key, value in resolved.items():
        if value is None:
            flat[key] = ""
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = json.dumps(value, sort_keys=True)
    return flat


class NullTracker:
    """Accepts everything, writes nothing: ``--report_to none`` and every process but the main one."""

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def log_image(self, tag: str, image, step: int) -> None:
        pass

    def log_video(self, tag: str, path: Path, step: int) -> None:
        pass

    def continue_from(self, step: int) -> None:
        """The run resumed at ``step`` (called before anything is logged)."""

    def close(self) -> None:
        pass


class AcceleratorTrackers(NullTracker):
    """The trainer's view of the trackers accelerate holds.

    The trackers start at the first logged value, not when this object is built: a resumed run learns
    its step only after the model is built, and TensorBoard must know it when its event file opens.
    Given ``purge_step`` one past the checkpoint's step, TensorBoard hides what the interrupted run had
    logged after that checkpoint, so the curves continue as one run instead of folding back.
    """

    def __init__(self, accelerator, config, config_values: dict[str, Any], output_dir: Path):
        self.accelerator = accelerator
        self.config = config
        self.config_values = config_values
        self.output_dir = Path(output_dir)
        self.image_layout = config.tracker_image_layout or "gallery"
        self.started = False
        self.finished = False
        self.purge_step: int | None = None

    @property
    def names(self) -> list[str]:
        """The started trackers, by accelerate's names (``tensorboard``, ``wandb``, ``comet_ml``)."""
        return [tracker.name for tracker in self.accelerator.trackers]

    def continue_from(self, step: int) -> None:
        if self.started:
            raise RuntimeError("continue_from() must come before the first logged value")
        self.purge_step = step + 1

    def start(self) -> None:
        """``init_trackers`` with each tracker's start-up arguments; the config goes to every tracker."""
        if self.started or self.finished:
            return
        self.started = True
        for tracker in self.accelerator.log_with:
            if getattr(tracker, "name", None) == "tensorboard" and self.purge_step is not None:
                tracker.init_kwargs["purge_step"] = self.purge_step  # read when its SummaryWriter opens
        self.accelerator.init_trackers(self.config.tracker_project_name, config=self.config_values,
                                       init_kwargs=self._init_kwargs())
        logger.info("reporting to %s (project %s, run %s)", ", ".join(self.names),
                    self.config.tracker_project_name, self.config.tracker_run_name)

    def _init_kwargs(self) -> dict[str, dict[str, Any]]:
        """wandb's run folder is ``WANDB_DIR`` when set, else the logging folder (so a run's files stay
        with its output); it is passed every time because wandb reads its environment only once per
        process. comet names the experiment after the run."""
        requested = requested_trackers(self.config.report_to)
        kwargs: dict[str, dict[str, Any]] = {}
        if "wandb" in requested:
            folder = Path(os.environ.get("WANDB_DIR") or logging_folder(self.config, self.output_dir))
            folder.mkdir(parents=True, exist_ok=True)
            kwargs["wandb"] = {"name": self.config.tracker_run_name, "dir": str(folder),
                               "id": wandb_run_id(logging_folder(self.config, self.output_dir)), "resume": "allow"}
        if "comet_ml" in requested:
            kwargs["comet_ml"] = {"experiment_config": _comet_experiment_config(self.config)}
        return kwargs

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.start()
        self.accelerator.log({tag: float(value) for tag, value in values.items()}, step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        """One validation grid, shown by every tracker that takes images."""
        self.start()
        for name in self.names:
            tracker = self.accelerator.get_tracker(name)
            if name == "tensorboard":
                _tensorboard_image(tracker, tag, image, step)
            elif name == "wandb":
                _wandb_image(tracker, tag, image, step, self.image_layout)
            elif name == "comet_ml":
                tracker.tracker.log_image(image.convert("RGB"), name=tag, step=step)

    def log_video(self, tag: str, path: Path, step: int) -> None:
        """A validation mp4, for the trackers that play video (wandb, comet); TensorBoard shows the
        first-frame grid only."""
        self.start()
        for name in self.names:
            tracker = self.accelerator.get_tracker(name)
            if name == "wandb":
                import wandb

                tracker.log({tag: wandb.Video(str(path), format="mp4")}, step=step)
            elif name == "comet_ml":
                tracker.tracker.log_video(str(path), name=f"{tag}/{Path(path).name}", step=step)

    def close(self) -> None:
        """Finish every tracker (wandb writes its run, TensorBoard closes its event file); safe twice."""
        if not self.started or self.finished:
            return
        self.finished = True
        for tracker in self.accelerator.trackers:
            tracker.finish()


#: The file in the logging folder that keeps the wandb run's id, so that a resumed run continues it
WANDB_RUN_ID_FILE = "wandb_run_id"


def wandb_run_id(folder: Path) -> str:
    """The id of this output folder's wandb run: the one an earlier (interrupted) process wrote to
    ``folder``, or a new one, saved there. A resumed run therefore appends to the same wandb run, with
    ``resume="allow"``, instead of starting a second one; ``--overwrite_output_dir`` sets the logging
    folder aside and with it the id, so an overwritten run starts a new wandb run."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WANDB_RUN_ID_FILE
    if path.is_file() and (saved := path.read_text(encoding="utf-8").strip()):
        return saved
    import secrets
    import string

    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's id form
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def _comet_experiment_config(config):
    """comet_ml's ``ExperimentConfig`` naming the run (comet_ml is installed: the config check refused
    ``--report_to comet_ml`` otherwise, and ``all`` only names installed trackers)."""
    import comet_ml

    return comet_ml.ExperimentConfig(name=config.tracker_run_name)


def _tensorboard_image(tracker, tag: str, image, step: int) -> None:
    import numpy as np

    array = np.asarray(image.convert("RGB"))[None]  # one image, as the batch add_images expects
    tracker.log_images({tag: array}, step=step, dataformats="NHWC")
    tracker.writer.flush()


def _wandb_image(tracker, tag: str, image, step: int, layout: str) -> None:
    """``--tracker_image_layout``: gallery shows the grid in wandb's media panel, table adds a row
    (step, size, grid) to a table, which compares steps side by side."""
    import wandb

    picture = wandb.Image(image.convert("RGB"), caption=f"step {step}")
    if layout == "table":
        size = tag.rsplit("/", 1)[-1]
        tracker.log_table(tag, columns=["step", "size", "grid"], data=[[step, size, picture]], step=step)
    else:
        tracker.log({tag: picture}, step=step)


def build_tracker(accelerator, config, output_dir: Path, is_main_process: bool,
                  config_file: Path | None = None):
    """The trackers ``--report_to`` names, on the main process; a :class:`NullTracker` elsewhere or for none."""
    if not is_main_process or not accelerator.log_with:
        return NullTracker()
    return AcceleratorTrackers(accelerator, config, tracker_config(config, config_file), output_dir)
