"""--report_to through accelerate's trackers: what tensorboard and wandb (offline) hold after a run logged
scalars, validation grids, a video and the config; which trackers a value asks for; the refusal of a
tracker whose package is missing; and a real training run reporting to all of them."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.testing.config import make_config
from tests.tracking.wandb_files import read_offline_run

SECRET_URL = "https://discord.com/api/webhooks/1/s3cr3t-t0ken"


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb writes its offline run under a temporary WANDB_DIR and never reaches the network."""
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield folder
    import wandb

    wandb.teardown()  # wandb keeps its settings (mode, folder) per process: the next test starts clean


def trackers_for(output: Path, **overrides):
    """An Accelerator set up as the trainer sets it up for ``overrides``, and the main process's trackers."""
    from accelerate import Accelerator

    from simpletuner.tracking.trackers import accelerator_tracking_arguments, build_tracker

    config = make_config(output_dir=str(output), webhook_config={"webhook_type": "discord", "callback_url": SECRET_URL},
                         **overrides)
    accelerator = Accelerator(**accelerator_tracking_arguments(config, output))
    return build_tracker(accelerator, config, output, is_main_process=True)


def red_square(size: int = 32):
    from PIL import Image

    return Image.new("RGB", (size, size), (220, 20, 20))


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


# --- which trackers ----------------------------------------------------------------------------------


def test_report_to_names_the_trackers(monkeypatch):
    from simpletuner.tracking import trackers

    monkeypatch.setattr(trackers, "tracker_is_installed", lambda name: name != "comet_ml")
    assert trackers.requested_trackers("none") == []
    assert trackers.requested_trackers("wandb") == ["wandb"]
    assert trackers.requested_trackers("all") == ["tensorboard", "wandb"]  # every installed one
    monkeypatch.setattr(trackers, "tracker_is_installed", lambda name: True)
    assert trackers.requested_trackers("all") == ["tensorboard", "wandb", "comet_ml"]


def test_none_and_other_processes_write_nothing(tmp_path):
    from accelerate import Accelerator

    from simpletuner.tracking.trackers import NullTracker, accelerator_tracking_arguments, build_tracker

    config = make_config(output_dir=str(tmp_path), report_to="tensorboard")
    accelerator = Accelerator(**accelerator_tracking_arguments(config, tmp_path))
    assert isinstance(build_tracker(accelerator, config, tmp_path, is_main_process=False), NullTracker)
    none = make_config(output_dir=str(tmp_path), report_to="none")
    assert accelerator_tracking_arguments(none, tmp_path)["log_with"] is None
    assert not (tmp_path / "logs").exists()


def test_the_config_shown_to_trackers_is_flat_and_redacted():
    from simpletuner.tracking.trackers import tracker_config

    values = tracker_config(make_config(output_dir="out", webhook_config={"webhook_type": "discord",
                                                                          "callback_url": SECRET_URL},
                                        validation_prompt=None, lora_rank=8))
    assert values["lora_rank"] == 8 and values["validation_prompt"] == ""
    assert all(isinstance(value, (bool, int, float, str)) for value in values.values())
    assert "s3cr3t" not in json.dumps(values)
    assert json.loads(values["webhook_config"])["callback_url"] == "https://discord.com/***"


# --- tensorboard -------------------------------------------------------------------------------------


def test_tensorboard_holds_scalars_grids_and_config(tmp_path):
    tracker = trackers_for(tmp_path, report_to="tensorboard", tracker_project_name="proj", tracker_run_name="run1")
    for step in (1, 2, 3):
        tracker.log_scalars({"loss/train": 0.5 * step, "loss/crepa": 0.1 * step, "lr": 1e-3}, step)
    tracker.log_image("validation/32x32", red_square(), 3)
    tracker.log_video("validation/32x32/a_cat", tmp_path / "never-read.mp4", 3)  # tensorboard shows grids only
    tracker.close()
    run_folder = tmp_path / "logs" / "proj" / "run1"
    events = tensorboard_events(run_folder)
    assert [(e.step, e.value) for e in events.Scalars("loss/train")] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert [e.step for e in events.Scalars("loss/crepa")] == [1, 2, 3]
    (image,) = events.Images("validation/32x32")
    assert (image.step, image.width, image.height) == (3, 32, 32)
    (hparams,) = run_folder.glob("*/hparams.yml")  # accelerate stores the config beside the events
    text = hparams.read_text()
    assert "tracker_run_name: run1" in text and "s3cr3t" not in text


# --- wandb (offline) ---------------------------------------------------------------------------------


def test_wandb_offline_run_holds_scalars_grids_video_and_config(tmp_path, wandb_offline):
    from simpletuner.validation.video import write_mp4

    tracker = trackers_for(tmp_path / "out", report_to="wandb", tracker_project_name="proj", tracker_run_name="run1")
    for step in (1, 2, 3):
        tracker.log_scalars({"loss/train": 0.5 * step, "loss/crepa": 0.25 * step}, step)
    tracker.log_image("validation/32x32", red_square(), 3)
    frames = [red_square(32) for _ in range(4)]
    tracker.log_video("validation/32x32/a_cat", write_mp4(frames, tmp_path / "clip.mp4", 8), 3)
    tracker.close()
    run = read_offline_run(wandb_offline)
    assert (run.name, run.project) == ("run1", "proj")
    assert run.values("loss/train") == [(1, 0.5), (2, 1), (3, 1.5)]
    assert run.values("loss/crepa") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert run.values("validation/32x32/_type") == [(3, "image-file")]
    assert run.values("validation/32x32/width") == [(3, 32)]
    assert run.values("validation/32x32/a_cat/_type") == [(3, "video-file")]
    (video,) = run.folder.glob("files/media/videos/validation/32x32/a_cat_3_*.mp4")
    assert video.read_bytes() == (tmp_path / "clip.mp4").read_bytes()
    assert len(list(run.folder.glob("files/media/images/validation/32x32_3_*.png"))) == 1
    assert run.config["tracker_run_name"] == "run1" and run.config["report_to"] == "wandb"
    assert "s3cr3t" not in json.dumps(run.config)


def test_wandb_table_layout_adds_a_row_per_grid(tmp_path, wandb_offline):
    tracker = trackers_for(tmp_path / "out", report_to="wandb", tracker_image_layout="table")
    tracker.log_image("validation/32x32", red_square(), 2)
    tracker.close()
    run = read_offline_run(wandb_offline)
    assert run.values("validation/32x32/_type") == [(2, "table-file")]
    (table_file,) = run.folder.glob("files/media/table/validation/32x32_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "size", "grid"]
    (row,) = table["data"]
    assert row[:2] == [2, "32x32"]  # the grid cell is filled in when the run is synced, not offline


def test_wandb_without_wandb_dir_writes_under_the_logging_folder(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    tracker = trackers_for(tmp_path, report_to="wandb")
    tracker.log_scalars({"loss/train": 1.0}, 1)
    tracker.close()
    assert read_offline_run(tmp_path / "logs").values("loss/train") == [(1, 1)]


def test_a_resumed_run_continues_its_wandb_run(tmp_path, wandb_offline):
    """The second process on the same output folder (a resume) logs to the first one's wandb run id; a
    run in another output folder gets its own."""
    import wandb

    from simpletuner.tracking.trackers import WANDB_RUN_ID_FILE

    for steps in ((1, 2), (3, 4)):
        tracker = trackers_for(tmp_path / "out", report_to="wandb")
        for step in steps:
            tracker.log_scalars({"loss/train": float(step)}, step)
        tracker.close()
        wandb.teardown()
    run_id = (tmp_path / "out" / "logs" / WANDB_RUN_ID_FILE).read_text().strip()
    logs = sorted(path.name for path in wandb_offline.glob("**/offline-run-*/run-*.wandb"))
    assert logs == [f"run-{run_id}.wandb"] * 2
    other = trackers_for(tmp_path / "other", report_to="wandb")
    other.log_scalars({"loss/train": 1.0}, 1)
    other.close()
    assert (tmp_path / "other" / "logs" / WANDB_RUN_ID_FILE).read_text().strip() != run_id


# --- comet_ml ----------------------------------------------------------------------------------------


def test_comet_without_its_package_is_refused_before_the_run(monkeypatch):
    from simpletuner.options.reporting_rules import check_tracker_installed
    from simpletuner.tracking import trackers

    monkeypatch.setattr(trackers, "tracker_is_installed", lambda name: name != "comet_ml")
    with pytest.raises(ConfigError, match=r"`--report_to comet_ml` needs the comet_ml package, which is not "
                                          r"installed; install it into this environment with pip install "
                                          r"'comet_ml>=3\.41'"):
        check_tracker_installed(make_config(report_to="comet_ml"))
    check_tracker_installed(make_config(report_to="all"))  # all: only what is installed


def test_comet_is_refused_by_the_config_check_of_a_real_command_line(tmp_path, monkeypatch):
    from simpletuner.options.resolve import resolve_run

    if "comet_ml" in sys.modules or __import__("importlib").util.find_spec("comet_ml") is not None:
        pytest.skip("comet_ml is installed here")
    (tmp_path / "d.json").write_text("[]")
    argv = ["--model_family", "sd1x", "--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
            "--data_backend_config", str(tmp_path / "d.json"), "--model_type", "lora", "--report_to", "comet_ml"]
    with pytest.raises(ConfigError, match="comet_ml>=3.41"):
        resolve_run(argv)


class FakeExperiment:
    """What accelerate's CometMLTracker calls on comet's experiment, recorded."""

    def __init__(self, **kwargs):
        self.start_kwargs = kwargs
        self.calls: list[tuple] = []

    def set_step(self, step):
        pass

    def log_parameters(self, values):
        self.calls.append(("parameters", values))

    def log_metric(self, name, value, step=None):
        self.calls.append(("metric", name, value, step))

    def log_image(self, image, name=None, step=None):
        self.calls.append(("image", name, image.size, step))

    def log_video(self, path, name=None, step=None):
        self.calls.append(("video", name, Path(path).name, step))

    def end(self):
        self.calls.append(("end",))


def test_comet_goes_through_accelerates_comet_tracker(tmp_path, monkeypatch):
    """comet_ml is not a dependency, so a stand-in module plays it: the calls prove the path through
    ``CometMLTracker`` (project, run name, config, metrics, grid, video)."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    experiments: list[FakeExperiment] = []

    def start(project_name, **kwargs):
        experiments.append(FakeExperiment(project_name=project_name, **kwargs))
        return experiments[-1]

    fake = types.ModuleType("comet_ml")
    fake.__version__ = "3.50.0"
    fake.__spec__ = __import__("importlib").machinery.ModuleSpec("comet_ml", None)
    fake.start = start
    fake.ExperimentConfig = lambda **kwargs: ("ExperimentConfig", kwargs)
    monkeypatch.setitem(sys.modules, "comet_ml", fake)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.COMETML])
    tracker = trackers_for(tmp_path, report_to="comet_ml", tracker_project_name="proj", tracker_run_name="run1")
    tracker.log_scalars({"loss/train": 0.5}, 1)
    tracker.log_image("validation/32x32", red_square(), 1)
    tracker.log_video("validation/32x32/a_cat", tmp_path / "a.mp4", 1)
    tracker.close()
    (experiment,) = experiments
    assert experiment.start_kwargs == {"project_name": "proj",
                                       "experiment_config": ("ExperimentConfig", {"name": "run1"})}
    kinds = [call[0] for call in experiment.calls]
    assert kinds == ["parameters", "metric", "image", "video", "end"]
    assert experiment.calls[0][1]["tracker_run_name"] == "run1"
    assert experiment.calls[1:4] == [("metric", "loss/train", 0.5, 1), ("image", "validation/32x32", (32, 32), 1),
                                     ("video", "validation/32x32/a_cat/a.mp4", "a.mp4", 1)]


# --- several trackers (comma-separated) ----------------------------------------------------------------


def test_a_comma_separated_report_to_names_each_tracker(monkeypatch):
    from simpletuner.tracking import trackers

    monkeypatch.setattr(trackers, "tracker_is_installed", lambda name: True)
    assert trackers.requested_trackers("tensorboard,wandb") == ["tensorboard", "wandb"]
    assert trackers.requested_trackers("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]  # no repeats


def report_to_from_command_line(tmp_path: Path, value: str) -> str:
    """``--report_to value`` read the way ``simpletuner train`` reads it (parsing and the config checks,
    which refuse a bad value before the empty dataset list is looked at)."""
    from simpletuner.options.resolve import resolve_run

    (tmp_path / "d.json").write_text("[]")
    argv = ["--model_family", "sd1x", "--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
            "--data_backend_config", str(tmp_path / "d.json"), "--model_type", "lora", "--report_to", value]
    return resolve_run(argv).config.report_to


def test_a_tracker_list_is_read_from_a_config_file_and_the_command_line():
    from simpletuner.options.reporting_rules import REPORTING_RULES
    from simpletuner.options.resolve import merge_sources

    from_file = merge_sources({"report_to": " tensorboard , wandb "}, {}, "config.json", [])
    from_cli = merge_sources({}, {"report_to": "wandb,tensorboard"}, "config.json", [])
    as_list = merge_sources({"report_to": ["tensorboard", "wandb", "tensorboard"]}, {}, "config.json", [])
    assert (from_file.report_to, from_cli.report_to) == ("tensorboard,wandb", "wandb,tensorboard")
    assert as_list.report_to == "tensorboard,wandb"  # a JSON list in config.json, repeats dropped
    with pytest.raises(ConfigError, match=r"`report_to` = 'mlflow' is not one of"):
        merge_sources({"report_to": ["wandb", "mlflow"]}, {}, "config.json", [])
    for rule in REPORTING_RULES:
        rule(from_file)  # tensorboard and wandb are dependencies: the list passes every reporting check


@pytest.mark.parametrize("value, refused", [("tensorboard,wandbb", "'wandbb'"), ("mlflow", "'mlflow'")])
def test_an_unknown_tracker_in_the_list_is_refused_by_name(tmp_path, value, refused):
    with pytest.raises(ConfigError, match=rf"`report_to` = {refused} is not one of: tensorboard, wandb, comet_ml, "
                                          r"all, none \(several may be given, separated by commas\)"):
        report_to_from_command_line(tmp_path, value)


@pytest.mark.parametrize("value, alone", [("all,wandb", "all"), ("tensorboard,none", "none")])
def test_all_and_none_stand_alone(tmp_path, value, alone):
    with pytest.raises(ConfigError, match=rf"`--report_to {value}`: {alone} cannot be combined with other trackers"):
        report_to_from_command_line(tmp_path, value)


def test_every_listed_tracker_must_be_installed(monkeypatch):
    from simpletuner.options.reporting_rules import check_tracker_installed
    from simpletuner.tracking import trackers

    monkeypatch.setattr(trackers, "tracker_is_installed", lambda name: name != "comet_ml")
    with pytest.raises(ConfigError, match=r"`--report_to tensorboard,comet_ml` needs the comet_ml package"):
        check_tracker_installed(make_config(report_to="tensorboard,comet_ml"))
    check_tracker_installed(make_config(report_to="tensorboard,wandb"))


def test_tensorboard_and_wandb_both_receive_the_run(tmp_path, wandb_offline):
    tracker = trackers_for(tmp_path, report_to="tensorboard,wandb", tracker_project_name="proj",
                           tracker_run_name="run1")
    for step in (1, 2):
        tracker.log_scalars({"loss/train": 0.5 * step}, step)
    tracker.log_image("validation/32x32", red_square(), 2)
    assert sorted(tracker.names) == ["tensorboard", "wandb"]
    tracker.close()
    events = tensorboard_events(tmp_path / "logs" / "proj" / "run1")
    assert [(e.step, e.value) for e in events.Scalars("loss/train")] == [(1, 0.5), (2, 1.0)]
    assert [image.step for image in events.Images("validation/32x32")] == [2]
    run = read_offline_run(wandb_offline)
    assert run.values("loss/train") == [(1, 0.5), (2, 1)]
    assert run.values("validation/32x32/_type") == [(2, "image-file")]
    assert run.config["report_to"] == "tensorboard,wandb"


# --- tracker names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["tracker_project_name", "tracker_run_name"])
def test_tracker_names_must_be_folder_names(option):
    from simpletuner.options.reporting_rules import check_tracker_names

    with pytest.raises(ConfigError, match=rf"`--{option}` 'a/b' is used as a folder name"):
        check_tracker_names(make_config(**{option: "a/b"}))
    with pytest.raises(ConfigError, match=rf"`--{option}` is empty"):
        check_tracker_names(make_config(**{option: " "}))


# --- a training run ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_training_run_reports_to_tensorboard_and_wandb(project: Path, wandb_offline, monkeypatch):
    """report_to all (tensorboard and wandb here): both hold every step's loss, the learning rate and the
    validation grid; the wandb config is the resolved one."""
    from simpletuner.cli import main
    from tests.training.conftest import run_args

    monkeypatch.delenv("RANK", raising=False)
    argv = run_args(project, "tracked", report_to="all", max_train_steps=3, optimizer="optimi-adamw",
                    validation_prompt="a red circle", validation_step_interval=3, validation_num_inference_steps=2,
                    validation_resolution=64, tracker_run_name="tiny")
    assert main(["train", *argv]) == 0
    run = read_offline_run(wandb_offline)
    assert [step for step, _ in run.values("loss/train")] == [1, 2, 3]
    assert [step for step, _ in run.values("lr")] == [1, 2, 3]
    assert run.values("validation/64x64/_type") == [(3, "image-file")]
    assert run.name == "tiny" and run.config["max_train_steps"] == 3
    events = tensorboard_events(project / "tracked" / "logs" / "simpletuner" / "tiny")
    losses = [(event.step, event.value) for event in events.Scalars("loss/train")]
    assert [step for step, _ in losses] == [1, 2, 3]
    assert [value for _, value in losses] == pytest.approx([value for _, value in run.values("loss/train")])
    assert [event.step for event in events.Images("validation/64x64")] == [3]
