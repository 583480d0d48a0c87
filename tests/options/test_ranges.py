"""Option ranges and the hostile inputs an outside probe found: every number has a declared range that
is checked when the value is parsed, files that are not UTF-8 or nest without end are one-line errors,
one option spelled twice in a file is refused, and messages never echo a huge value in full.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from simpletuner.cli import main
from simpletuner.configure.questions import option_question
from simpletuner.data.build import _batches_with, minimum_repeats
from simpletuner.options import ConfigError, all_options, options_by_name
from simpletuner.options.docs import render_options_markdown
from simpletuner.options.files import MAX_NESTING
from simpletuner.options.resolve import build_train_parser, resolve_run
from simpletuner.options.spec import MAX_SEED, Option
from simpletuner.options.values import coerce_value
from tests.conftest import write_minimal_dataset_list

#: Numeric options that deliberately declare no range, and why.
UNBOUNDED = {"crepa_encoder_frames_batch_size": "zero or negative means all frames at once"}
NOT_UTF8 = b'{"note": "caf\xe9"}'  # Latin-1, as an editor on another system might save it


@pytest.fixture
def base(tmp_path: Path) -> dict:
    dataset_list = write_minimal_dataset_list(tmp_path)
    return {"model_family": "sd1x", "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list)}


def write_config(tmp_path: Path, data: dict | str | bytes) -> Path:
    path = tmp_path / "config.json"
    if isinstance(data, dict):
        data = json.dumps(data)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def error_of(tmp_path: Path, argv: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(argv, environ={}, root=tmp_path)
    return str(error.value)


def file_error(tmp_path: Path, config: dict | str | bytes) -> str:
    path = write_config(tmp_path, config)
    return error_of(tmp_path, ["--config", str(path)]).replace(f"{path}", "CONFIG")


# --- the declarations ---------------------------------------------------------------------------------


def test_every_number_option_declares_a_range_and_its_default_lies_in_it() -> None:
    numeric = [option for option in all_options() if option.kind in ("int", "float")]
    unbounded = sorted(o.name for o in numeric if o.minimum is None and o.maximum is None)
    assert unbounded == sorted(UNBOUNDED)
    for option in numeric:
        if option.default is not None:
            assert coerce_value(option, option.default, "default") == option.default, option.name


def test_ranges_chosen_for_the_probed_options() -> None:
    table = options_by_name()
    assert (table["seed"].minimum, table["seed"].maximum) == (0, 2**32 - 1) == (0, MAX_SEED)
    assert table["validation_seed"].range_text() == "[0, 4294967295]"
    assert table["learning_rate"].range_text() == table["lora_alpha"].range_text() == "> 0"
    assert table["lr_end"].range_text() == ">= 0"
    assert table["validation_num_inference_steps"].range_text() == ">= 1"
    assert table["ema_decay"].range_text() == "(0, 1)"
    assert table["adam_beta1"].range_text() == "[0, 1)"
    assert table["timestep_bias_portion"].range_text() == "(0, 1]"
    assert table["caption_dropout_probability"].range_text() == "[0, 1]"


def test_a_bad_range_declaration_fails_at_import() -> None:
    with pytest.raises(ValueError, match="minimum 5 must be below maximum 1"):
        Option(name="x", kind="int", default=1, help="h", group="g", minimum=5, maximum=1)
    with pytest.raises(ValueError, match="only int and float options take a minimum"):
        Option(name="x", kind="str", default="", help="h", group="g", minimum=0)
    with pytest.raises(ValueError, match="an exclusive bound needs the bound itself"):
        Option(name="x", kind="float", default=1.0, help="h", group="g", exclusive_minimum=True)


def test_ranges_are_shown_in_help_and_documentation() -> None:
    help_text = " ".join(build_train_parser().format_help().split())
    assert "(range: [0, 4294967295])" in help_text
    assert "(range: > 0) (default: 0.0001)" in help_text
    rows = {line.split(" | ")[0]: line for line in render_options_markdown().splitlines() if line.startswith("| `--")}
    assert "| `> 0` |" in rows["| `--learning_rate`"]
    assert "| `[0, 4294967295]` |" in rows["| `--seed`"]


# --- numbers the probe got through ----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "message"), [
    ("seed", -1, "`--seed` = -1 must be between 0 and 4294967295"),
    ("seed", 10**40, "`--seed` = 10000000000000000000000000000000000000000 must be between 0 and 4294967295"),
    ("validation_seed", 2**32, "`--validation_seed` = 4294967296 must be between 0 and 4294967295"),
    ("learning_rate", "inf", "`--learning_rate` = inf is not a finite number; it must be positive"),
    ("learning_rate", "nan", "`--learning_rate` = nan is not a finite number; it must be positive"),
    ("lora_alpha", "Infinity", "`--lora_alpha` = Infinity is not a finite number; it must be positive"),
    ("lora_alpha", -1, "`--lora_alpha` = -1.0 must be positive"),
    ("lr_end", "-inf", "`--lr_end` = -inf is not a finite number; it must not be negative"),
    ("lr_end", "+inf", "`--lr_end` = +inf is not a finite number; it must not be negative"),
    ("num_processes", 2**63, "`--num_processes` = 9223372036854775808 must be between 1 and 1048576"),
    ("validation_num_inference_steps", 0, "`--validation_num_inference_steps` = 0 must be at least 1"),
    ("validation_num_inference_steps", -1, "`--validation_num_inference_steps` = -1 must be at least 1"),
    ("train_batch_size", 10**40, "`--train_batch_size` = 10000000000000000000000000000000000000000 must be between "
                                 "1 and 65536"),
    ("train_batch_size", 1e40, "`--train_batch_size` = 1e+40 must be between 1 and 65536"),
    ("max_train_steps", 10**40, "`--max_train_steps` = 10000000000000000000000000000000000000000 must be between "
                                f"{-(2**63)} and {2**63 - 1} (a 64-bit integer)"),
    ("ema_decay", 1, "`--ema_decay` = 1.0 must be between 0 and 1 (exclusive)"),
])
def test_out_of_range_numbers_in_a_config_file(tmp_path: Path, base: dict, key: str, value, message: str) -> None:
    error = file_error(tmp_path, {**base, key: value})
    assert error.startswith(message) and error.endswith(" (CONFIG)"), error


def test_json_nan_and_infinity_literals_are_refused(tmp_path: Path, base: dict) -> None:
    text = json.dumps(base)[:-1] + ', "learning_rate": NaN, "lr_end": -Infinity}'
    assert file_error(tmp_path, text) == "`--learning_rate` = nan is not a finite number; it must be positive (CONFIG)"


def test_a_400_digit_integer_in_a_float_option_is_an_error_not_an_overflow(tmp_path: Path, base: dict) -> None:
    message = file_error(tmp_path, json.dumps(base)[:-1] + ', "learning_rate": ' + "9" * 400 + "}")
    assert message == ("`--learning_rate` = " + "9" * 80 + "… (400 characters) is not a finite number; it must be "
                       "positive (CONFIG)")


def test_numbers_longer_than_python_reads_are_an_error(tmp_path: Path, base: dict) -> None:
    message = file_error(tmp_path, json.dumps(base)[:-1] + ', "seed": ' + "9" * 5000 + "}")
    assert message.startswith("CONFIG: cannot read the JSON: a number has more digits than any setting can use")
    message = error_of(tmp_path, ["--seed", "9" * 5000])
    assert message == "command line: `seed` = '" + "9" * 79 + "… (5000 characters) is not an integer"


def test_edges_of_a_range_are_accepted(tmp_path: Path, base: dict) -> None:
    config = write_config(tmp_path, {**base, "seed": MAX_SEED, "validation_seed": 0, "lora_alpha": 1e-9,
                                     "caption_dropout_probability": 1, "adam_beta1": 0})
    run = resolve_run(["--config", str(config)], environ={}, root=tmp_path)
    assert (run.config.seed, run.config.validation_seed, run.config.caption_dropout_probability) == (MAX_SEED, 0, 1.0)


def test_the_same_range_check_guards_the_command_line_and_the_wizard(tmp_path: Path, base: dict) -> None:
    argv = [item for key, value in base.items() for item in (f"--{key}", value)]
    assert error_of(tmp_path, argv + ["--seed", "-1"]) == \
        "`--seed` = -1 must be between 0 and 4294967295 (command line)"
    assert option_question("lora_rank", 16).check("0") == "`--lora_rank` = 0 must be at least 1 (answer)"
    assert option_question("learning_rate", 1e-4).check("nan").startswith("`--learning_rate` = nan is not a finite")


def test_process_counts_from_config_env_are_bounded(tmp_path: Path, base: dict) -> None:
    argv = [item for key, value in base.items() for item in (f"--{key}", value)]
    with pytest.raises(ConfigError, match=r"TRAINING_NUM_PROCESSES=9223372036854775808 must be at most 1048576"):
        resolve_run(argv, environ={"TRAINING_NUM_PROCESSES": str(2**63)}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"TRAINING_MAIN_PROCESS_PORT=70000 must be at most 65535"):
        resolve_run(argv, environ={"TRAINING_MAIN_PROCESS_PORT": "70000"}, root=tmp_path)


def test_minimum_repeats_is_computed_even_for_an_absurd_batch_size() -> None:
    buckets = {(64, 64): ["image"] * 4, (96, 64): ["image"] * 2}
    started = time.perf_counter()
    repeats = minimum_repeats(buckets, 0, 10**40, needed=1)
    assert time.perf_counter() - started < 0.1
    assert repeats == 10**40 // 4 - 1  # the 4-image bucket alone then fills one batch
    assert _batches_with(buckets, repeats, 10**40, False) >= 1 > _batches_with(buckets, repeats - 1, 10**40, False)


@pytest.mark.parametrize("keep_small", [False, True])
def test_minimum_repeats_equals_counting_up_one_at_a_time(keep_small: bool) -> None:
    def counted(buckets, repeats, batch, needed):
        while _batches_with(buckets, repeats, batch, keep_small) < needed:
            repeats += 1
        return repeats

    for sizes in ([1], [3, 1], [5, 2, 2], [7]):
        buckets = {(index, index): ["image"] * size for index, size in enumerate(sizes)}
        for batch in (1, 2, 3, 8, 13):
            for needed in (1, 2, 5):
                for start in (0, 2):
                    assert minimum_repeats(buckets, start, batch, needed, keep_small) == \
                        counted(buckets, start, batch, needed), (sizes, batch, needed, start)
    with pytest.raises(ValueError, match="no image"):
        minimum_repeats({}, 0, 4, 1)


# --- output_dir -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["/dev/null", "file", "file/below"])
def test_output_dir_that_cannot_be_a_folder_is_refused(tmp_path: Path, base: dict, where: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    output_dir = where if where.startswith("/") else str(tmp_path / where)
    message = file_error(tmp_path, {**base, "output_dir": output_dir})
    problem = "exists and is not a folder" if where != "file/below" else \
        f"cannot be created: {tmp_path / 'file'} is a file, not a folder"
    assert message == f"`--output_dir` {output_dir!r} {problem}; give a folder (it is created when missing)"


def test_output_dir_name_too_long_for_the_os_is_an_error(tmp_path: Path, base: dict) -> None:
    message = file_error(tmp_path, {**base, "output_dir": "x" * 5000})
    assert message.startswith("`--output_dir` 'xxxx") and "(5000 characters) cannot be used as a path" in message


# --- files that are not UTF-8, nest without end, or spell a key twice -------------------------------------


@pytest.mark.parametrize("option", ["data_backend_config", "webhook_config", "peft_lora_target_modules"])
def test_a_referenced_file_that_is_not_utf8_names_the_file(tmp_path: Path, base: dict, option: str) -> None:
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(NOT_UTF8)
    message = file_error(tmp_path, {**base, option: str(latin1)})
    assert f"{latin1}: not UTF-8 text (byte 13 is 0xe9); save the JSON file as UTF-8" in message


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    assert file_error(tmp_path, b"\xff\xfe{}") == \
        "CONFIG: not UTF-8 text (byte 0 is 0xff); save the JSON file as UTF-8"
    toml = tmp_path / "config.toml"
    toml.write_bytes(b'model_family = "caf\xe9"\n')
    assert error_of(tmp_path, ["--config", str(toml)]) == \
        f"{toml}: not UTF-8 text (byte 19 is 0xe9); save the TOML file as UTF-8"


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 5000, 100_000])
def test_deep_nesting_in_the_config_is_an_error(tmp_path: Path, base: dict, depth: int) -> None:
    text = json.dumps(base)[:-1] + ', "lycoris_config": ' + "[" * depth + "]" * depth + "}"
    assert file_error(tmp_path, text) == (f"CONFIG: lists/objects are nested more than {MAX_NESTING} levels deep; "
                                          "no setting needs that, so the file is probably generated wrongly")


def test_deep_nesting_in_a_referenced_file_or_inline_value_is_an_error(tmp_path: Path, base: dict) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' * 5000 + "1" + "}" * 5000)
    for option in ("data_backend_config", "webhook_config"):
        assert f"{deep}: lists/objects are nested more than" in file_error(tmp_path, {**base, option: str(deep)})
    argv = [item for key, value in base.items() for item in (f"--{key}", value)]
    for depth in (MAX_NESTING + 1, 50_000):
        message = error_of(tmp_path, argv + ["--webhook_config", "[" * depth + "]" * depth])
        assert message.startswith("`webhook_config`: lists/objects are nested more than")
    deep_toml = tmp_path / "config.toml"
    deep_toml.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert "lists/objects are nested more than" in error_of(tmp_path, ["--config", str(deep_toml)])


@pytest.mark.parametrize(("config", "first", "second"), [
    ('{"--model_family": "sdxl", "model_family": "sd1x"}', "'--model_family'", "'model_family'"),
    ('{"checkpointing_steps": 5, "checkpoint_step_interval": 10}', "'checkpointing_steps'",
     "'checkpoint_step_interval'"),
])
def test_one_option_spelled_twice_in_a_file_is_an_error(tmp_path: Path, config: str, first: str, second: str) -> None:
    name = second.strip("'-")
    assert file_error(tmp_path, config) == f"CONFIG: {first} and {second} both set the option `{name}`; keep one of them"


def test_one_key_written_twice_is_an_error(tmp_path: Path) -> None:
    assert file_error(tmp_path, '{"learning_rate": 1e-4, "learning_rate": 1e-3}') == (
        "CONFIG: the key 'learning_rate' appears twice in one object; JSON keeps only the last, so remove the one you "
        "do not mean")


def test_config_env_that_is_not_utf8_or_has_an_open_quote(tmp_path: Path, base: dict) -> None:
    argv = [item for key, value in base.items() for item in (f"--{key}", value)]
    env_file = tmp_path / "config" / "config.env"
    env_file.parent.mkdir()
    env_file.write_bytes(b"TRAINING_NUM_PROCESSES=\xff\n")
    assert error_of(tmp_path, argv) == f"{env_file}: not UTF-8 text (byte 23 is 0xff); save the config.env as UTF-8"
    env_file.write_text('ACCELERATE_EXTRA_ARGS="--gpu_ids all\n')
    assert error_of(tmp_path, argv) == (f"{env_file}:1: cannot read the value of ACCELERATE_EXTRA_ARGS: "
                                        "No closing quotation")


# --- what messages show --------------------------------------------------------------------------------


def test_huge_values_are_cut_in_messages(tmp_path: Path, base: dict) -> None:
    message = file_error(tmp_path, {**base, "lora_rank": "x" * 100_000})
    assert message == "CONFIG: `lora_rank` = '" + "x" * 79 + "… (100000 characters) is not an integer"
    message = file_error(tmp_path, {**base, "y" * 100_000: 1})
    assert message.startswith("CONFIG: unknown option `" + "y" * 80 + "… (100000 characters)`")
    message = file_error(tmp_path, {**base, "lora_type": "z" * 100_000})
    assert len(message) < 300 and "… (100000 characters) is not one of: standard, lycoris" in message


def test_the_cli_prints_one_line_whatever_the_value_holds(tmp_path: Path, base: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, {**base, "line\nbreak\x1b[31m": 1})
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["train", "--config", str(config), "--dry-run"]) == 2
    assert err.getvalue() == (f"simpletuner train: configuration error: {config}: unknown option "
                              "`line\\nbreak\\x1b[31m`; run `simpletuner options` to list every option\n")


def test_configure_refuses_an_out_of_range_answer_and_writes_nothing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["configure", "config/config.json", "--non-interactive", "--set", "seed=-1"])
    assert code == 2
    assert err.getvalue() == ("simpletuner configure: configuration error: `--seed` = -1 must be between 0 and "
                              "4294967295 (--set)\n")
    assert not (tmp_path / "config").exists()


def test_a_path_the_os_cannot_look_up_names_its_option(tmp_path: Path, base: dict) -> None:
    """Any rule that looks a path up (here the GGUF check on the model path) reports a name too long
    for the OS as a config error naming the option, not as an OSError traceback."""
    message = file_error(tmp_path, {**base, "pretrained_model_name_or_path": "a/" * 3000 + "model"})
    assert message.startswith("`--pretrained_model_name_or_path` 'a/a/a/")
    assert message.endswith("… (6005 characters) cannot be used as a path (File name too long); give a shorter or "
                            "existing path")


@pytest.mark.parametrize("target", ["fifo", "folder"])
def test_configure_never_replaces_what_is_not_a_plain_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tiny_image_folder: Path, target: str) -> None:
    """A config naming /dev/null (or a folder) as its dataset list must not have it renamed over:
    as root that would replace the device itself. A FIFO stands in for /dev/null here."""
    import os

    monkeypatch.chdir(tmp_path)
    special = tmp_path / "special.json"
    os.mkfifo(special) if target == "fifo" else special.mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps({"data_backend_config": str(special)}))
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["configure", "config/config.json", "--non-interactive", "--set", "model_family=sd1x",
                     "--set", "output_dir=out", "--set", f"dataset.instance_data_dir={tiny_image_folder}"])
    assert code == 2
    assert err.getvalue() == (f"simpletuner configure: configuration error: {str(special)!r} exists and is not a "
                              "regular file; the setup files must be plain files, so give another path (nothing "
                              "was changed)\n")
    assert (special.is_fifo() if target == "fifo" else special.is_dir())
    assert sorted(p.name for p in (tmp_path / "config").iterdir()) == ["config.json"]


def test_seed_for_each_device_keeps_every_process_seed_in_range(tmp_path: Path, base: dict) -> None:
    highest = MAX_SEED - (2**20 - 1)
    config = write_config(tmp_path, {**base, "seed": highest, "seed_for_each_device": True})
    assert resolve_run(["--config", str(config)], environ={}, root=tmp_path).config.seed == highest
    assert file_error(tmp_path, {**base, "seed": highest + 1, "seed_for_each_device": True}) == (
        f"`--seed` = {highest + 1} must be at most {highest} with `--seed_for_each_device`: process r uses seed + r, "
        f"and seeds end at {MAX_SEED}")
