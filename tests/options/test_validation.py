"""Every configuration mistake stops the run before anything loads, with a message naming key, value and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from tests.conftest import write_minimal_dataset_list
from simpletuner.options.resolve import resolve_run


@pytest.fixture
def base(tmp_path: Path) -> dict:
    dataset_list = write_minimal_dataset_list(tmp_path)
    return {"model_family": "sd1x", "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list)}


def base_argv(base: dict) -> list[str]:
    return [item for key, value in base.items() for item in (f"--{key}", value)]


def resolve(tmp_path: Path, argv=()):
    return resolve_run(list(argv), environ={}, root=tmp_path)


def error_of(tmp_path: Path, argv=()) -> str:
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path, argv)
    return str(error.value)


def write_config(tmp_path: Path, data) -> Path:
    path = tmp_path / "config" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def test_minimal_config_is_valid(tmp_path: Path, base: dict) -> None:
    run = resolve(tmp_path, base_argv(base))
    assert run.warnings == []
    assert (run.config.model_family, run.config.model_type, run.config.optimizer) == ("sd1x", "lora", "adamw_bf16")


# --- unknown keys and bad values --------------------------------------------------------------------


def test_unknown_cli_flag_names_closest_option(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--learning_rat", "0.1"])
    assert message == "command line: unknown option `learning_rat`; did you mean `learning_rate`?"
    message = error_of(tmp_path, base_argv(base) + ["--learning_rat=0.1"])
    assert "unknown option `learning_rat`; did you mean `learning_rate`?" in message


def test_unknown_cli_flag_without_close_match_points_at_the_option_list(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--qqqqqq", "1"])
    assert message == "command line: unknown option `qqqqqq`; run `simpletuner options` to list every option"
    assert "unexpected argument 'stray'" in error_of(tmp_path, base_argv(base) + ["stray"])


def test_unknown_key_in_config_file_names_closest_option(tmp_path: Path, base: dict) -> None:
    path = write_config(tmp_path, {**base, "learning_rat": 0.1})
    assert error_of(tmp_path) == f"{path}: unknown option `learning_rat`; did you mean `learning_rate`?"


def test_bad_type_names_key_value_and_expected_type(tmp_path: Path, base: dict) -> None:
    path = write_config(tmp_path, {**base, "train_batch_size": "four"})
    assert error_of(tmp_path) == f"{path}: `train_batch_size` = 'four' is not an integer"
    write_config(tmp_path, base)
    message = error_of(tmp_path, ["--learning_rate", "fast"])
    assert message == "command line: `learning_rate` = 'fast' is not a number"


def test_int_option_rejects_fractions_and_booleans(tmp_path: Path, base: dict) -> None:
    path = write_config(tmp_path, {**base, "lora_rank": 2.5})
    assert error_of(tmp_path) == f"{path}: `lora_rank` = 2.5 is not an integer"
    write_config(tmp_path, {**base, "lora_rank": True})
    assert "`lora_rank` = True is not an integer" in error_of(tmp_path)


def test_bool_given_maybe(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--use_ema", "maybe"])
    assert message == "command line: `use_ema` = 'maybe' is not true or false"
    path = write_config(tmp_path, {**base, "validation_disable": "maybe"})
    assert error_of(tmp_path) == f"{path}: `validation_disable` = 'maybe' is not true or false"


def test_value_outside_choices_lists_them(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--model_type", "dora"])
    assert message == "command line: `model_type` = 'dora' is not one of: full, lora"


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "config" / "config.json"
    path.parent.mkdir()
    path.write_text('{\n  "model_family": "sd1x",\n  "output_dir": "out",,\n}\n', encoding="utf-8")
    message = error_of(tmp_path)
    assert message.startswith(f"{path}: malformed JSON at line 3, column 23:")


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config" / "config.toml"
    path.parent.mkdir()
    path.write_text('model_family = "sd1x"\noutput_dir = \n', encoding="utf-8")
    message = error_of(tmp_path)
    assert message.startswith(f"{path}: malformed TOML:") and "line 2" in message


def test_config_file_must_hold_an_object(tmp_path: Path) -> None:
    path = write_config(tmp_path, ["model_family", "sd1x"])
    assert error_of(tmp_path) == f"{path}: the top level must be an object of option names to values, not list"


# --- cross-field rules -----------------------------------------------------------------------------


def test_unimplemented_option_set_to_non_default(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--sla_config", '{"routes": []}'])
    assert message.startswith("`--sla_config` is not supported yet (got {'routes': []})")
    assert message.endswith("remove it from your config or command line")


def test_global_data_options_are_checked_against_every_dataset(tmp_path: Path, base: dict) -> None:
    run = resolve(tmp_path, base_argv(base) + ["--cache_dir_vae", "/tmp/latents", "--cache_dir_text", "x"])
    assert (run.config.cache_dir_vae, run.config.cache_dir_text) == ("/tmp/latents", "x")
    message = error_of(tmp_path, base_argv(base) + ["--skip_file_discovery", "vae,bogus"])
    assert message.startswith("`--skip_file_discovery` has stage 'bogus'")
    assert error_of(tmp_path, base_argv(base) + ["--dataloader_prefetch_qlen", "0"]) == (
        "`--dataloader_prefetch_qlen` = 0 must be at least 1 (command line)")
    message = error_of(tmp_path, base_argv(base) + ["--maximum_image_size", "2048"])
    assert "maximum_image_size and target_downsample_size must be set together" in message
    message = error_of(tmp_path, base_argv(base) + ["--only_instance_prompt", "true"])
    assert "only_instance_prompt is set but 'instance_prompt' is empty" in message


def test_unimplemented_option_at_its_default_is_accepted(tmp_path: Path, base: dict) -> None:
    write_config(tmp_path, {**base, "distillation_config": None})
    assert resolve(tmp_path).config.distillation_config is None


def test_unsupported_value_lists_supported_ones(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--validation_noise_scheduler", "perflow"])
    assert message == ("`--validation_noise_scheduler perflow` is not supported yet; supported values: ddim, ddpm, "
                       "euler, euler-a, unipc, dpm++")


def test_unknown_family_lists_available_ones(tmp_path: Path, base: dict) -> None:
    from simpletuner.models.registry import FAMILIES
    from simpletuner.options.table.model import MODEL_FAMILIES

    missing = [name for name in MODEL_FAMILIES if name not in FAMILIES]
    if not missing:
        pytest.skip("every family of --model_family is implemented")
    message = error_of(tmp_path, base_argv(base) + ["--model_family", missing[0]])
    assert message == (f"`--model_family {missing[0]}` is not supported yet; available families: "
                       f"{', '.join(sorted(FAMILIES))}")


def test_invalid_flavour_lists_the_family_flavours(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--model_flavour", "2.1"])
    assert message == "`--model_flavour 2.1` is not a flavour of sd1x; choose one of: 1.5, 1.4, dreamshaper, realvis"
    run = resolve(tmp_path, base_argv(base) + ["--model_family", "sd2x", "--model_flavour", "2.1-base"])
    assert run.config.model_flavour == "2.1-base"


def test_prediction_type_must_suit_the_family(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--prediction_type", "flow_matching"])
    assert message == "`--prediction_type flow_matching` is not supported for sd1x; use one of: epsilon, v_prediction, sample"


def test_lora_flag_conflicts_with_full_training(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--model_type", "full", "--lora_rank", "8"])
    assert message.startswith("`--lora_rank` only applies to `--model_type lora`, but `--model_type full` is set")
    # the same conflict when the two come from different sources
    write_config(tmp_path, {**base, "lora_alpha": 4})
    assert error_of(tmp_path, ["--model_type", "full"]).startswith("`--lora_alpha` only applies to `--model_type lora`")
    # full training without LoRA flags is fine
    write_config(tmp_path, base)
    assert resolve(tmp_path, ["--model_type", "full"]).config.model_type == "full"


def test_validation_disable_conflicts_with_validation_interval(tmp_path: Path, base: dict) -> None:
    message = error_of(tmp_path, base_argv(base) + ["--validation_disable", "--validation_step_interval", "10"])
    assert message.startswith("`--validation_disable` and `--validation_step_interval` conflict")


def test_missing_required_options(tmp_path: Path) -> None:
    message = error_of(tmp_path, ["--learning_rate", "0.001"])
    assert message.startswith("missing required option(s): `--model_family`, `--output_dir`")


def test_missing_dataset_list(tmp_path: Path, base: dict) -> None:
    argv = ["--model_family", "sd1x", "--output_dir", "out"]
    assert error_of(tmp_path, argv).startswith("`--data_backend_config` is required")
    missing = str(tmp_path / "nope.json")
    assert error_of(tmp_path, argv + ["--data_backend_config", missing]) == (
        f"`--data_backend_config`: file {missing!r} does not exist"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train_batch_size", "0"], "`--train_batch_size` = 0 must be between 1 and 65536"),
        (["--lr_warmup_steps", "-1"], "`--lr_warmup_steps` = -1 must not be negative"),
        (["--num_train_epochs", "0"],
         "set `--max_train_steps` or `--num_train_epochs` to a positive number; both are 0"),
        (["--caption_dropout_probability", "1.5"], "`--caption_dropout_probability` = 1.5 must be between 0 and 1"),
        (["--learning_rate", "0"], "`--learning_rate` = 0.0 must be positive"),
        (["--checkpoint_step_interval", "0"], "`--checkpoint_step_interval` = 0 must be at least 1"),
        (["--checkpoints_total_limit", "0"], "`--checkpoints_total_limit` = 0 must be at least 1"),
    ],
)
def test_out_of_range_values(tmp_path: Path, base: dict, flags: list, message: str) -> None:
    assert error_of(tmp_path, base_argv(base) + flags).startswith(message)


def test_validation_interval_without_prompt_is_a_warning(tmp_path: Path, base: dict) -> None:
    run = resolve(tmp_path, base_argv(base) + ["--validation_step_interval", "10"])
    assert run.warnings == [
        "`--validation_step_interval` is set but `--validation_prompt` is empty: no validation images will be made"
    ]
