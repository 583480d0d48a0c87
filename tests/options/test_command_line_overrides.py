"""A switch typed on the command line wins over what the config file keeps, and says so; launcher
variables written without their prefix in config.env are named with the right spelling."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.options.resolve import resolve_run
from tests.conftest import write_minimal_dataset_list


def write_setup(root: Path, env_file: str | None = None, **config) -> Path:
    """config/config.json (plus config/config.env when given) for an sd1x run in ``root``."""
    (root / "config").mkdir(exist_ok=True)
    values = {"model_family": "sd1x", "output_dir": str(root / "out"), **config}
    if "data_backend_config" not in values:
        values["data_backend_config"] = str(write_minimal_dataset_list(root))
    path = root / "config" / "config.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    if env_file is not None:
        (root / "config" / "config.env").write_text(env_file, encoding="utf-8")
    return path


def resolve(root: Path, *argv: str):
    return resolve_run(list(argv), environ={}, root=root)


# --- --validation_disable ------------------------------------------------------------------------------


def test_validation_disable_on_the_command_line_wins_over_the_files_schedule(tmp_path: Path) -> None:
    config_file = write_setup(tmp_path, validation_steps=100, validation_epoch_interval=2,
                              validation_on_startup=True, validation_prompt="a red square")
    run = resolve(tmp_path, "--validation_disable")
    config = run.config
    assert config.validation_disable is True
    assert (config.validation_step_interval, config.validation_epoch_interval, config.validation_on_startup) == \
        (None, None, False)
    assert config.validation_prompt == "a red square"  # only the schedule is dropped
    assert run.notes == [f"validation:   off, because `--validation_disable` on the command line overrides "
                         f"validation_steps 100, validation_epoch_interval 2, validation_on_startup true from "
                         f"{config_file}"]
    assert "validation_step_interval" not in config.explicit


def test_the_schedule_stays_when_validation_is_not_disabled_on_the_command_line(tmp_path: Path) -> None:
    write_setup(tmp_path, validation_step_interval=100)
    run = resolve(tmp_path, "--validation_disable", "false")
    assert (run.config.validation_step_interval, run.notes) == (100, [])


def test_both_on_the_same_level_still_conflict(tmp_path: Path) -> None:
    write_setup(tmp_path, validation_disable=True, validation_step_interval=100)
    with pytest.raises(ConfigError, match="`--validation_disable` and `--validation_step_interval` conflict"):
        resolve(tmp_path)
    write_setup(tmp_path)
    with pytest.raises(ConfigError, match="`--validation_disable` and `--validation_step_interval` conflict"):
        resolve(tmp_path, "--validation_disable", "--validation_step_interval", "10")


def test_the_dry_run_says_why_validation_is_off(tmp_path: Path, tiny_image_folder: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from simpletuner.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    config_file = write_setup(tmp_path, validation_step_interval=100, pretrained_model_name_or_path=str(tmp_path / "model"),
                              resolution=64, resolution_type="pixel")
    dataset_list = json.loads((tmp_path / "multidatabackend.json").read_text())
    dataset_list[0]["instance_data_dir"] = str(tiny_image_folder)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(dataset_list))
    assert main(["train", "--dry-run", "--validation_disable"]) == 0
    assert (f"validation:   off, because `--validation_disable` on the command line overrides validation_step_interval "
            f"100 from {config_file}") in capsys.readouterr().out


@pytest.mark.slow
def test_the_startup_summary_says_why_validation_is_off(tmp_path_factory, caplog, monkeypatch) -> None:
    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project

    root = make_family_project(tmp_path_factory.mktemp("summary"), "sd1x")
    monkeypatch.chdir(root)
    monkeypatch.delenv("RANK", raising=False)
    write_setup(root, pretrained_model_name_or_path=str(root / "model"), data_backend_config=str(root / "multidatabackend.json"),
                validation_step_interval=1, validation_prompt="a red square", resolution=64, resolution_type="pixel",
                aspect_bucket_alignment=8, max_train_steps=1, train_batch_size=2, report_to="none",
                disable_benchmark=True, optimizer="optimi-adamw", cache_dir=str(root / "cache"))
    with caplog.at_level(logging.INFO):
        assert main(["train", "--validation_disable"]) == 0
    summary = next(record.getMessage() for record in caplog.records if "=== simpletuner run ===" in record.getMessage())
    assert "\nvalidation:   off, because `--validation_disable` on the command line overrides validation_step_interval 1" \
        in summary
    assert not (root / "out" / "validation").exists()


# --- config.env ------------------------------------------------------------------------------------------


def test_launcher_variables_without_their_prefix_are_named(tmp_path: Path) -> None:
    write_setup(tmp_path, env_file="NUM_PROCESSES=2\nexport log_level=DEBUG\nTRAINING_NUM_MACHINES=1\nPATH_HINT=x\n")
    run = resolve(tmp_path)
    env_file = tmp_path / "config" / "config.env"
    assert run.launcher.num_processes == 1  # the misspelt line is not read
    assert run.warnings == [
        f"{env_file}: NUM_PROCESSES=2 is not read by simpletuner; write TRAINING_NUM_PROCESSES=2 instead",
        f"{env_file}: log_level=DEBUG is not read by simpletuner; write SIMPLETUNER_LOG_LEVEL=DEBUG instead",
    ]


def test_the_warning_reaches_the_dry_run(tmp_path: Path, tiny_image_folder: Path, capsys, caplog,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from simpletuner.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRAINING_NUM_PROCESSES", raising=False)
    (tmp_path / "model").mkdir()
    write_setup(tmp_path, env_file="NUM_PROCESSES=2\n", pretrained_model_name_or_path=str(tmp_path / "model"),
                resolution=64, resolution_type="pixel")
    dataset_list = json.loads((tmp_path / "multidatabackend.json").read_text())
    dataset_list[0]["instance_data_dir"] = str(tiny_image_folder)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(dataset_list))
    assert main(["train", "--dry-run"]) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert f"{tmp_path / 'config' / 'config.env'}: NUM_PROCESSES=2 is not read by simpletuner; write " \
           "TRAINING_NUM_PROCESSES=2 instead" in warnings
    assert "launcher: 1 process(es)" in capsys.readouterr().out
