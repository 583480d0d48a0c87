"""Where option values come from: CLI > config file > defaults, config lookup, {env:VAR}, aliases, config.env."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.options.files import LauncherSettings, load_launcher_settings, parse_env_file
from tests.conftest import write_minimal_dataset_list
from simpletuner.options.resolve import TrainConfig, resolve_run


@pytest.fixture
def base(tmp_path: Path) -> dict:
    """The smallest valid config: the required keys plus a dataset list that exists."""
    dataset_list = write_minimal_dataset_list(tmp_path)
    return {"model_family": "sd1x", "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list)}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def resolve(tmp_path: Path, argv=(), environ=None):
    return resolve_run(list(argv), environ={} if environ is None else environ, root=tmp_path)


# --- precedence ---------------------------------------------------------------------------------


def test_cli_beats_config_file_beats_defaults(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", {**base, "learning_rate": 0.001, "train_batch_size": 4})
    run = resolve(tmp_path, ["--learning_rate", "0.005"])
    config = run.config
    assert run.config_file == tmp_path / "config" / "config.json"
    assert config.learning_rate == 0.005  # CLI wins over the file
    assert config.train_batch_size == 4  # the file wins over the default (1)
    assert config.adam_beta1 == 0.9  # untouched: the table default
    assert config.model_family == "sd1x"
    assert {"learning_rate", "train_batch_size", "model_family"} <= config.explicit
    assert "adam_beta1" not in config.explicit
    assert config.non_default()["learning_rate"] == 0.005 and "adam_beta1" not in config.non_default()
    assert run.dry_run is False and run.warnings == []


def test_values_are_typed_from_cli_strings(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", base)
    config = resolve(tmp_path, ["--train_batch_size", "3", "--use_ema", "--lr_warmup_steps=7", "--seed", "none"]).config
    assert config.train_batch_size == 3 and isinstance(config.train_batch_size, int)
    assert config.use_ema is True  # a bare boolean flag means true
    assert config.lr_warmup_steps == 7
    assert config.seed is None
    assert resolve(tmp_path, ["--use_ema", "false"]).config.use_ema is False


def test_flags_only_without_any_config_file(tmp_path: Path, base: dict) -> None:
    argv = [item for key, value in base.items() for item in (f"--{key}", value)]
    run = resolve(tmp_path, argv + ["--dry-run"])
    assert run.config_file is None
    assert run.dry_run is True
    assert run.config.output_dir == base["output_dir"]


def test_config_keys_may_carry_leading_dashes(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", {f"--{k}": v for k, v in base.items()} | {"--lora_rank": 8})
    config = resolve(tmp_path).config
    assert config.lora_rank == 8
    assert config.model_family == "sd1x"


def test_config_toml_is_found_and_json_is_preferred(tmp_path: Path, base: dict) -> None:
    toml = "\n".join(f'{k} = "{v}"' for k, v in base.items()) + "\nlearning_rate = 3e-4\n'--lora_rank' = 4\n"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.toml").write_text(toml, encoding="utf-8")
    run = resolve(tmp_path)
    assert run.config_file == tmp_path / "config" / "config.toml"
    assert (run.config.learning_rate, run.config.lora_rank) == (3e-4, 4)
    write_json(tmp_path / "config" / "config.json", {**base, "learning_rate": 0.01})
    run = resolve(tmp_path)
    assert run.config_file == tmp_path / "config" / "config.json"
    assert run.config.learning_rate == 0.01


def test_explicit_config_path(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", {**base, "lora_rank": 2})
    other = write_json(tmp_path / "elsewhere" / "mine.json", {**base, "lora_rank": 32})
    run = resolve(tmp_path, ["--config", str(other)])
    assert run.config_file == other
    assert run.config.lora_rank == 32


def test_env_name_picks_config_folder(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", {**base, "lora_rank": 2})
    write_json(tmp_path / "config" / "portrait" / "config.json", {**base, "lora_rank": 64})
    write_json(tmp_path / "config" / "landscape" / "config.json", {**base, "lora_rank": 8})
    assert resolve(tmp_path).config.lora_rank == 2
    run = resolve(tmp_path, environ={"ENV": "portrait"})
    assert run.config_file == tmp_path / "config" / "portrait" / "config.json"
    assert run.config.lora_rank == 64
    assert resolve(tmp_path, ["--env", "portrait"]).config.lora_rank == 64
    # --env wins over the ENV variable
    assert resolve(tmp_path, ["--env", "landscape"], environ={"ENV": "portrait"}).config.lora_rank == 8


def test_env_name_without_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config" / "empty").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"ENV=empty: no config.json or config.toml in .*config/empty"):
        resolve(tmp_path, ["--env", "empty"])


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: file '.*nope.json' does not exist"):
        resolve(tmp_path, ["--config", str(tmp_path / "nope.json")])


# --- {env:VAR} ------------------------------------------------------------------------------------


def test_env_placeholders_are_substituted(tmp_path: Path, base: dict) -> None:
    config_file = {**base, "output_dir": "{env:RUNS}/lora-{env:NAME}", "validation_prompt": "a {env:NAME} photo"}
    write_json(tmp_path / "config" / "config.json", config_file)
    config = resolve(tmp_path, environ={"RUNS": "/data/runs", "NAME": "cat"}).config
    assert config.output_dir == "/data/runs/lora-cat"
    assert config.validation_prompt == "a cat photo"


def test_missing_env_variable_is_a_clear_error(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", {**base, "output_dir": "{env:RUNS}/lora"})
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path, environ={})
    assert "`output_dir` uses {env:RUNS} but the environment variable RUNS is not set" in str(error.value)
    assert "config.json" in str(error.value)


# --- deprecated aliases ---------------------------------------------------------------------------


def test_deprecated_alias_on_command_line(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", base)
    run = resolve(tmp_path, ["--checkpointing_steps", "5", "--validation_steps=7", "--validation_prompt", "a cat"])
    assert run.config.checkpoint_step_interval == 5
    assert run.config.validation_step_interval == 7
    assert (
        "command line: `--checkpointing_steps` is another tool's name for `--checkpoint_step_interval`; read as `--checkpoint_step_interval`" in run.warnings
    )
    assert "command line: `--validation_steps` is another tool's name for `--validation_step_interval`; read as `--validation_step_interval`" in run.warnings


def test_deprecated_alias_in_config_file(tmp_path: Path, base: dict) -> None:
    path = write_json(tmp_path / "config" / "config.json", {**base, "checkpointing_steps": 5, "--validation_steps": 9})
    run = resolve(tmp_path, ["--validation_prompt", "a cat"])
    assert run.config.checkpoint_step_interval == 5
    assert run.config.validation_step_interval == 9
    assert f"{path}: `checkpointing_steps` is another tool's name for `checkpoint_step_interval`; read as `checkpoint_step_interval`" in run.warnings
    assert f"{path}: `validation_steps` is another tool's name for `validation_step_interval`; read as `validation_step_interval`" in run.warnings


def test_cli_new_name_beats_file_alias(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", {**base, "checkpointing_steps": 5})
    assert resolve(tmp_path, ["--checkpoint_step_interval", "50"]).config.checkpoint_step_interval == 50


# --- config.env ------------------------------------------------------------------------------------

ENV_FILE = """\
# launcher settings
export TRAINING_NUM_PROCESSES=2
TRAINING_DYNAMO_BACKEND="inductor"   # compile with inductor
ACCELERATE_EXTRA_ARGS='--gpu_ids 0,1 --main_training_function main'

SIMPLETUNER_LOG_LEVEL=debug
"""


def test_env_file_parsing_handles_export_quotes_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "config.env"
    path.write_text(ENV_FILE, encoding="utf-8")
    assert parse_env_file(path) == {
        "TRAINING_NUM_PROCESSES": "2",
        "TRAINING_DYNAMO_BACKEND": "inductor",
        "ACCELERATE_EXTRA_ARGS": "--gpu_ids 0,1 --main_training_function main",
        "SIMPLETUNER_LOG_LEVEL": "debug",
    }


def test_launcher_settings_from_config_env(tmp_path: Path, base: dict) -> None:
    write_json(tmp_path / "config" / "config.json", base)
    (tmp_path / "config" / "config.env").write_text(ENV_FILE, encoding="utf-8")
    launcher = resolve(tmp_path).launcher
    assert launcher == LauncherSettings(
        num_processes=2,
        dynamo_backend="inductor",
        accelerate_extra_args=("--gpu_ids", "0,1", "--main_training_function", "main"),
        log_level="DEBUG",
        source=str(tmp_path / "config" / "config.env"),
    )


def test_launcher_defaults_without_config_env(tmp_path: Path) -> None:
    assert load_launcher_settings(tmp_path, None, {}) == LauncherSettings()
    assert LauncherSettings().num_processes == 1 and LauncherSettings().log_level == "INFO"


def test_env_specific_config_env_and_real_environment_win(tmp_path: Path) -> None:
    (tmp_path / "config" / "big").mkdir(parents=True)
    (tmp_path / "config" / "config.env").write_text("TRAINING_NUM_PROCESSES=2\nTRAINING_DYNAMO_BACKEND=inductor\n")
    (tmp_path / "config" / "big" / "config.env").write_text("TRAINING_NUM_PROCESSES=4\nTRAINING_DYNAMO_BACKEND=no\n")
    launcher = load_launcher_settings(tmp_path, "big", {})
    assert (launcher.num_processes, launcher.dynamo_backend) == (4, None)  # "no" means no dynamo
    environ = {"TRAINING_NUM_PROCESSES": "8", "SIMPLETUNER_LOG_LEVEL": "warning"}
    launcher = load_launcher_settings(tmp_path, "big", environ)
    assert (launcher.num_processes, launcher.log_level) == (8, "WARNING")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("TRAINING_NUM_PROCESSES=two\n", "TRAINING_NUM_PROCESSES='two' is not an integer"),
        ("TRAINING_NUM_PROCESSES=0\n", "TRAINING_NUM_PROCESSES=0 must be at least 1"),
        ("SIMPLETUNER_LOG_LEVEL=loud\n", "SIMPLETUNER_LOG_LEVEL='LOUD': use DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        ("# ok\nTRAINING_NUM_PROCESSES\n", "config.env:2: expected KEY=VALUE, got 'TRAINING_NUM_PROCESSES'"),
    ],
)
def test_bad_config_env_is_a_clear_error(tmp_path: Path, base: dict, text: str, message: str) -> None:
    write_json(tmp_path / "config" / "config.json", base)
    (tmp_path / "config" / "config.env").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path)
    assert message in str(error.value)


# --- TrainConfig ------------------------------------------------------------------------------------


def test_train_config_is_immutable_and_replace_checks_names() -> None:
    config = TrainConfig({"learning_rate": 1e-4, "lora_rank": 16})
    with pytest.raises(AttributeError, match="immutable"):
        config.learning_rate = 1.0
    changed = config.replace(lora_rank=4)
    assert (changed.lora_rank, config.lora_rank) == (4, 16)
    assert changed.explicit == frozenset({"lora_rank"})
    with pytest.raises(AttributeError, match="did you mean `lora_rank`"):
        config.replace(lora_rnk=4)
    with pytest.raises(AttributeError, match="did you mean `learning_rate`"):
        config.learning_rat  # noqa: B018  (the attribute access is what is tested)
