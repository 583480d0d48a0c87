"""Checkpoint option mistakes stop the run at config time, naming the flag, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.options.conftest import error_of, resolve  # noqa: F401 (argv is the conftest fixture)


def executable(tmp_path: Path, mode: int = 0o755) -> str:
    script = tmp_path / "cleanup.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(mode)
    return str(script)


def test_valid_checkpoint_options_resolve(tmp_path, argv):
    config = resolve(tmp_path, argv + [
        "--checkpoint_step_interval", "100", "--checkpoint_epoch_interval", "1", "--checkpointing_rolling_steps", "10",
        "--checkpoints_rolling_total_limit", "2", "--checkpointing_use_tempdir", "true",
        "--disk_low_threshold", "100G", "--disk_low_action", "script", "--disk_low_script", executable(tmp_path),
        "--post_checkpoint_script", "/bin/echo {local_checkpoint_path} {global_step:05d} {validation_prompt}",
    ]).config
    assert (config.checkpoint_epoch_interval, config.checkpointing_rolling_steps) == (1, 10)
    assert resolve(tmp_path, argv + ["--disk_low_threshold", "52428800"]).config.disk_low_threshold == "52428800"


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint_epoch_interval", "0"], "`--checkpoint_epoch_interval` = 0 must be at least 1"),
    (["--checkpointing_rolling_steps", "-2"], "`--checkpointing_rolling_steps` = -2 must be at least 1"),
    (["--checkpointing_rolling_steps", "5", "--checkpoints_rolling_total_limit", "0"],
     "`--checkpoints_rolling_total_limit` = 0 must be at least 1"),
    (["--checkpoints_rolling_total_limit", "3"],
     "`--checkpoints_rolling_total_limit` = 3 limits rolling checkpoints, but `--checkpointing_rolling_steps` is unset"),
])
def test_bad_intervals(tmp_path, argv, flags, message):
    assert error_of(tmp_path, argv + flags).startswith(message)


def test_disk_low_threshold_must_parse(tmp_path, argv):
    message = error_of(tmp_path, argv + ["--disk_low_threshold", "lots"])
    assert message.startswith("`--disk_low_threshold` = 'lots' is not a size")
    assert "500M, 100G or 1T" in message
    assert "is not a size" in error_of(tmp_path, argv + ["--disk_low_threshold", "0"])


def test_disk_low_action_needs_a_threshold(tmp_path, argv):
    message = error_of(tmp_path, argv + ["--disk_low_action", "wait"])
    assert message.startswith("`--disk_low_action wait` needs `--disk_low_threshold`")


def test_disk_low_script_only_with_the_script_action(tmp_path, argv):
    message = error_of(tmp_path, argv + ["--disk_low_threshold", "1G", "--disk_low_script", executable(tmp_path)])
    assert "`--disk_low_script`" in message and "only runs with `--disk_low_action script` (got 'stop')" in message


def test_disk_low_script_action_needs_an_existing_executable(tmp_path, argv):
    flags = argv + ["--disk_low_threshold", "1G", "--disk_low_action", "script"]
    assert error_of(tmp_path, flags).startswith("`--disk_low_action script` needs `--disk_low_script`")
    missing = str(tmp_path / "nope.sh")
    assert error_of(tmp_path, flags + ["--disk_low_script", missing]) == (
        f"`--disk_low_script` {missing!r} does not exist (or is not a file); give the path of an executable cleanup "
        "script")
    script = executable(tmp_path, mode=0o644)
    assert error_of(tmp_path, flags + ["--disk_low_script", script]) == (
        f"`--disk_low_script` {script!r} is not executable; run `chmod +x {script}`")


@pytest.mark.parametrize("template, message", [
    ("/bin/echo {checkpoint_dir}", "uses unknown placeholder(s) {checkpoint_dir}; available: "),
    ("/bin/echo {validation_nonsense} {}", "uses unknown placeholder(s) {}, {validation_nonsense}"),
    ("/bin/echo {global_step", "is not a valid template"),
    ("/bin/echo 'unclosed {global_step}", "cannot be split into arguments"),
    ("/bin/echo {model_family:05d}", "cannot be filled in: Unknown format code 'd'"),
    ("  ", "`--post_checkpoint_script` is empty"),
])
def test_post_checkpoint_script_template_errors(tmp_path, argv, template, message):
    assert message in error_of(tmp_path, argv + ["--post_checkpoint_script", template])


def test_unknown_placeholder_error_lists_the_available_ones(tmp_path, argv):
    message = error_of(tmp_path, argv + ["--post_checkpoint_script", "/bin/echo {step}"])
    assert message.startswith("`--post_checkpoint_script` uses unknown placeholder(s) {step}")
    for name in ("{local_checkpoint_path}", "{global_step}", "{remote_checkpoint_path}", "{validation_guidance}"):
        assert name in message


def test_save_time_options_without_any_checkpoint_warn(tmp_path, argv):
    warnings = resolve(tmp_path, argv + ["--checkpointing_use_tempdir", "true",
                                         "--post_checkpoint_script", "no-such-program-here {global_step}"]).warnings
    assert any(w.startswith("`--checkpointing_use_tempdir`, `--post_checkpoint_script` only acts when a checkpoint")
               for w in warnings)
    assert any("'no-such-program-here' is not an executable" in w for w in warnings)
