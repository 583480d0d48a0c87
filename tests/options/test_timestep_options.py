"""Cross-field rules for timestep bias, noise-schedule, diff2flow and flow-matching options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from simpletuner.models import registry
from simpletuner.options import ConfigError
from simpletuner.options.resolve import resolve_run
from simpletuner.options.validation import check_flow_options
from tests.conftest import write_minimal_dataset_list


@pytest.fixture
def argv(tmp_path: Path) -> list[str]:
    dataset_list = write_minimal_dataset_list(tmp_path)
    base = {"model_family": "sd1x", "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list)}
    return [item for key, value in base.items() for item in (f"--{key}", value)]


def resolve(tmp_path: Path, argv: list[str], *extra: str):
    return resolve_run([*argv, *extra], environ={}, root=tmp_path)


def error_of(tmp_path: Path, argv: list[str], *extra: str) -> str:
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path, argv, *extra)
    return str(error.value)


def test_timestep_bias_settings_are_accepted(tmp_path, argv):
    run = resolve(tmp_path, argv, "--timestep_bias_strategy", "range", "--timestep_bias_begin", "100",
                  "--timestep_bias_end", "300", "--timestep_bias_multiplier", "2", "--disable_segmented_timestep_sampling")
    assert run.warnings == []
    assert (run.config.timestep_bias_begin, run.config.timestep_bias_end) == (100, 300)
    run = resolve(tmp_path, argv, "--timestep_bias_strategy", "later", "--timestep_bias_portion", "0.1",
                  "--timestep_bias_multiplier", "3")
    assert run.warnings == []


@pytest.mark.parametrize("extra, message", [
    (("--timestep_bias_multiplier", "2"), "`--timestep_bias_multiplier` only applies with `--timestep_bias_strategy"),
    (("--timestep_bias_strategy", "later", "--timestep_bias_begin", "5"),
     "`--timestep_bias_begin` only applies to `--timestep_bias_strategy range`"),
    (("--timestep_bias_strategy", "range", "--timestep_bias_portion", "0.5"),
     "`--timestep_bias_portion` only applies to `--timestep_bias_strategy earlier` or `later`"),
    (("--timestep_bias_strategy", "earlier", "--timestep_bias_multiplier", "0"),
     "`--timestep_bias_multiplier` = 0.0 must be positive"),
    (("--timestep_bias_strategy", "earlier", "--timestep_bias_portion", "1.5", "--timestep_bias_multiplier", "2"),
     "`--timestep_bias_portion` = 1.5 must be in (0, 1]"),
    (("--timestep_bias_strategy", "range", "--timestep_bias_begin", "500", "--timestep_bias_end", "500"),
     "`--timestep_bias_begin` = 500 must be smaller than `--timestep_bias_end` = 500"),
    (("--timestep_bias_strategy", "range", "--timestep_bias_begin", "-1"), "`--timestep_bias_begin` = -1 must not"),
    (("--diff2flow_loss", "true"), "`--diff2flow_loss` needs `--diff2flow_enabled true`"),
    (("--diff2flow_enabled", "true", "--diff2flow_loss", "true", "--snr_gamma", "5"),
     "`--snr_gamma` weights the native epsilon loss and is not defined for `--diff2flow_loss`"),
    (("--diff2flow_enabled", "true", "--diff2flow_loss", "true", "--rescale_betas_zero_snr", "true"),
     "`--diff2flow_loss` with epsilon prediction cannot recover the image"),
])
def test_timestep_and_diff2flow_mistakes_are_clear_errors(tmp_path, argv, extra, message):
    assert error_of(tmp_path, argv, *extra).startswith(message)


def test_warnings_for_settings_that_do_nothing_or_misbehave(tmp_path, argv):
    [warning] = resolve(tmp_path, argv, "--timestep_bias_strategy", "later").warnings
    assert warning.startswith("`--timestep_bias_strategy later` has no effect with `--timestep_bias_multiplier` 1")
    [warning] = resolve(tmp_path, argv, "--diff2flow_enabled", "true").warnings
    assert warning.startswith("`--diff2flow_enabled` alone does not change training")
    [warning] = resolve(tmp_path, argv, "--rescale_betas_zero_snr", "true").warnings
    assert "epsilon prediction" in warning and "v_prediction" in warning
    [warning] = resolve(tmp_path, argv, "--rescale_betas_zero_snr", "true", "--prediction_type", "v_prediction").warnings
    assert "--inference_scheduler_timestep_spacing trailing" in warning
    run = resolve(tmp_path, argv, "--rescale_betas_zero_snr", "true", "--prediction_type", "v_prediction",
                  "--training_scheduler_timestep_spacing", "trailing", "--diff2flow_enabled", "true",
                  "--diff2flow_loss", "true")
    assert run.warnings == []


def test_flow_options_are_refused_for_ddpm_families(tmp_path, argv):
    assert error_of(tmp_path, argv, "--flow_schedule_shift", "3").startswith(
        "`--flow_schedule_shift` only applies to flow-matching model families")
    config = resolve(tmp_path, argv).config
    check_flow_options(config)  # defaults are fine anywhere
    with pytest.raises(ConfigError, match=r"`--flow_schedule_shift` only applies to flow-matching model families; "
                                          r"sd1x trains epsilon, v_prediction"):
        check_flow_options(config.replace(flow_schedule_shift=3.0))
    with pytest.raises(ConfigError, match="`--flow_beta_schedule_alpha` only applies to flow-matching"):
        check_flow_options(config.replace(flow_beta_schedule_alpha=1.0))


def test_flow_options_cross_checks_for_a_flow_family(tmp_path, argv, monkeypatch):
    flow_family = dataclasses.replace(registry.FAMILIES["sd1x"], name="flowy", prediction_types=("flow_matching",))
    monkeypatch.setitem(registry.FAMILIES, "flowy", flow_family)
    config = resolve(tmp_path, argv).config.replace(model_family="flowy")
    check_flow_options(config.replace(flow_schedule_shift=3.0, flow_use_beta_schedule=True))
    for changes, message in [
        (dict(flow_use_uniform_schedule=True, flow_use_beta_schedule=True), "conflict: pick one distribution"),
        (dict(flow_schedule_auto_shift=True, flow_schedule_shift=2.0), "the automatic shift replaces the fixed one"),
        (dict(flow_max_timestep_boundary=0.4), "add `--flow_use_discrete_schedule true`"),
        (dict(flow_use_discrete_schedule=True, flow_min_timestep_boundary=0.5, flow_max_timestep_boundary=0.4),
         r"0 <= min \(0.5\) < max \(0.4\) <= 1"),
        (dict(flow_use_discrete_schedule=True, flow_use_beta_schedule=True), "draws from its own table"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_flow_options(config.replace(**changes))
