"""Fuzzed configs: whatever a config file or ``--set`` holds, ``train --dry-run`` and ``configure
--non-interactive`` either accept it or answer with one clean line (exit status 2), never a traceback
and never a hang.

The configs are built by hypothesis from a valid base: options set to values of the right and wrong
types, numbers at and beyond their ranges (400 digits, nan, inf, 2**63), unknown keys, the same
option spelled twice, conflicting options, nested garbage, empty and 100 KB strings, paths to files
that are not UTF-8 or nest thousands of levels deep, and whole files that are no config at all. The
examples are derandomized and bounded, so CI runs the same ones every time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from simpletuner.cli import main
from simpletuner.options import alias_targets, all_options
from simpletuner.options.spec import Option

#: Seconds one dry run or configure run may take before the example counts as a hang.
EXAMPLE_TIMEOUT_S = 30
#: The longest error line a user should have to read (values in it are cut to 80 characters).
LONGEST_MESSAGE = 2200
#: CI runs the same 150 examples every time; SIMPLETUNER_FUZZ_EXAMPLES=5000 runs that many fresh ones.
LONG_RUN = os.environ.get("SIMPLETUNER_FUZZ_EXAMPLES")
FUZZ_SETTINGS = settings(max_examples=int(LONG_RUN or 150), deadline=None, derandomize=not LONG_RUN, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

OPTIONS = all_options()
NUMERIC = [option for option in OPTIONS if option.kind in ("int", "float")]
CHOICE_OPTIONS = [option for option in OPTIONS if option.choices]
ALIASES = sorted(alias_targets())
#: Options whose value is a path (or a JSON file): they get the hostile paths more often.
PATH_OPTIONS = [option for option in OPTIONS if option.kind in ("str", "json", "list") and any(
    word in option.name for word in ("dir", "path", "config", "file", "library", "modules", "script"))]
#: Options that only make sense together, or that exclude each other: a fuzzed config sets a pair.
CONFLICTS = [
    {"model_type": "full", "lora_rank": 4},
    {"validation_disable": True, "validation_step_interval": 5},
    {"use_soft_min_snr": True, "snr_gamma": 5},
    {"flow_use_uniform_schedule": True, "flow_use_beta_schedule": True},
    {"lr_scale_sqrt": True},
    {"timestep_bias_strategy": "range", "timestep_bias_begin": 500, "timestep_bias_end": 10},
    {"max_train_steps": 0, "num_train_epochs": 0},
    {"webhook_reporting_interval": 5},
    {"use_ema": False, "ema_decay": 0.9},
    {"offset_noise": False, "noise_offset": 0.2},
]


class Hang(Exception):
    """An example ran past EXAMPLE_TIMEOUT_S."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`Hang` inside the block after ``seconds`` (SIGALRM; the test runs in the main thread)."""
    def expire(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the project every example starts from --------------------------------------------------------


class Project:
    """A tiny valid setup plus the hostile files a fuzzed value may point at."""

    def __init__(self, root: Path):
        from PIL import Image

        self.root = root
        images = root / "images"
        images.mkdir()
        for index in range(2):
            Image.new("RGB", (64, 64), (90 * index, 100, 200)).save(images / f"img{index}.png")
            (images / f"img{index}.txt").write_text(f"a shape number {index}", encoding="utf-8")
        self.dataset_list = root / "multidatabackend.json"
        self.dataset_list.write_text(json.dumps([
            {"id": "tiny", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile"},
            {"id": "text-embeds", "dataset_type": "text_embeds", "type": "local", "cache_dir": str(root / "cache")},
        ]), encoding="utf-8")
        self.base = {
            "model_family": "sd1x", "output_dir": str(root / "out"), "data_backend_config": str(self.dataset_list),
            "resolution": 64, "resolution_type": "pixel", "aspect_bucket_alignment": 8, "lora_rank": 4,
            "max_train_steps": 10,
        }
        hostile = root / "hostile"
        hostile.mkdir()
        files = {
            "latin1.json": b'{"note": "caf\xe9"}',
            "utf16.json": json.dumps(["a"]).encode("utf-16"),
            "deep.json": b"[" * 20000 + b"]" * 20000,
            "deep_objects.json": b'{"a":' * 3000 + b"1" + b"}" * 3000,
            "duplicate_keys.json": b'{"a": 1, "a": 2}',
            "huge_number.json": b"[" + b"9" * 5000 + b"]",
            "not_json.json": b"{this is not json",
            "empty.json": b"",
            "text.txt": b"just words",
        }
        for name, data in files.items():
            (hostile / name).write_bytes(data)
        os.mkfifo(hostile / "fifo.json")  # like /dev/null: a name that is no regular file
        self.hostile_paths = [str(hostile / name) for name in files] + [
            str(hostile), str(hostile / "fifo.json"), str(hostile / "missing" / "folder" / "file.json"),
            str(hostile / "latin1.json" / "below.json"), "a/" * 3000 + "x.json", "~no_such_user_here/x.json",
            str(images / "img0.png"), "",
        ]
        #: Only the dry run may meet system paths: it writes nothing, while configure writes its files.
        self.system_paths = ["/dev/null", "/", "/proc/self/status"]

    def fresh_folder(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root, prefix="example-"))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """One project for every example, run from its folder with no launcher variables set."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name in ("ENV", "TRAINING_NUM_PROCESSES", "TRAINING_NUM_MACHINES", "SIMPLETUNER_LOG_LEVEL",
                     "MIXED_PRECISION", "ACCELERATE_EXTRA_ARGS", "TRAINING_DYNAMO_BACKEND"):
            patch.delenv(name, raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield Project(root)


# --- values -----------------------------------------------------------------------------------------

#: A value that stands for "lists nested N levels deep"; the raw text is spliced in after json.dumps,
#: which would itself hit the recursion limit on such a value.
DEEP_MARK = re.compile(r"__deep_nesting_(\d+)__")


def _deep(depth: int) -> str:
    return f"__deep_nesting_{depth}__"


def _nested_text(depth: int) -> str:
    return "[" * depth + "]" * depth


EDGE_NUMBERS = st.sampled_from([
    0, -1, 1, 2, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, -(2**63) - 1, 10**40, -(10**40), 10**400, 1e40, -1e40,
    1e308, 5e-324, 0.5, -0.0, 1.5, 100, 65537,
])
EDGE_STRINGS = st.sampled_from([
    "nan", "NaN", "-nan", "inf", "+inf", "-inf", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400, "9" * 5000,
    "", " ", "none", "null", "true", "false", "0x10", "1_000", "٣", "1e3", "2.5", "-0", "\x00", "a\x00b",
    "{env:NO_SUCH_VARIABLE}", "line\nbreak", "[", "[[[[", "{", '{"a": [1, {"b": null}]}', "[1, 2]", "a,b,,c",
    "é" * 30, "../../etc/passwd", "-",
])
HUGE_STRINGS = st.sampled_from([100_000, 20_000, 5_000]).flatmap(
    lambda size: st.sampled_from(["x" * size, "ab " * (size // 3), "9" * size, "[" * size, "{" * size]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
GARBAGE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=12)
DEEP = st.sampled_from([40, 65, 70, 500, 990, 1200, 5000]).map(_deep)


def value_for(option: Option) -> st.SearchStrategy:
    """Values aimed at one option: its choices, its range edges and just beyond, and its default."""
    picks: list[Any] = [option.default]
    if option.choices:
        picks += list(option.choices) + [str(option.choices[0]).upper(), f"{option.choices[0]} "]
    for bound in (option.minimum, option.maximum):
        if bound is not None:
            picks += [bound, bound - 1, bound + 1, bound - 1e-9, bound + 1e-9, -bound, bound * 10**30]
    if option.kind == "bool":
        picks += [True, False, "yes", "off", 2, "maybe"]
    if option.kind in ("list", "json"):
        picks += [[], {}, ["a", 1, None], {"k": [1, 2]}, "[]", "{}"]
    return st.sampled_from(picks)


def valid_value_for(option: Option) -> st.SearchStrategy:
    """A value the option's kind, choices and range accept (rules between options may still refuse it)."""
    if option.choices:
        return st.sampled_from(option.choices)
    if option.kind == "bool":
        return st.booleans()
    if option.kind == "int":
        low = option.minimum if option.minimum is not None else -(2**63)
        high = option.maximum if option.maximum is not None else 2**63 - 1
        return st.integers(low + option.exclusive_minimum, high - option.exclusive_maximum)
    if option.kind == "float":
        return st.floats(option.minimum, option.maximum, exclude_min=option.exclusive_minimum,
                         exclude_max=option.exclusive_maximum, allow_nan=False, allow_infinity=False)
    return st.just(option.default)


def any_value(project: Project, system_paths: bool = False) -> st.SearchStrategy:
    paths = project.hostile_paths + (project.system_paths if system_paths else [])
    return st.one_of(EDGE_NUMBERS, EDGE_STRINGS, EDGE_STRINGS, HUGE_STRINGS, GARBAGE, DEEP, st.sampled_from(paths),
                     st.sampled_from(paths), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=30))


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, drawn about as often as its weight says."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


def option_entry(project: Project, system_paths: bool = False) -> st.SearchStrategy:
    """One key of a config file and its value: a known option (as written, with dashes or as an alias)
    with a value aimed at it or any value at all, a path option with a hostile path, or an unknown key."""
    anything = any_value(project, system_paths)
    paths = st.sampled_from(project.hostile_paths + (project.system_paths if system_paths else []))

    def for_option(option: Option) -> st.SearchStrategy:
        spellings = [option.name, f"--{option.name}", *(a for a in ALIASES if alias_targets()[a] == option.name)]
        spelling = weighted((4, st.just(option.name)), (1, st.sampled_from(spellings)))
        return st.tuples(spelling, weighted((3, valid_value_for(option)), (2, value_for(option)), (2, anything)))

    known = st.sampled_from(OPTIONS) | st.sampled_from(NUMERIC) | st.sampled_from(CHOICE_OPTIONS)
    path_entry = st.tuples(st.sampled_from(PATH_OPTIONS).map(lambda option: option.name), paths)
    unknown = st.tuples(st.one_of(st.text(max_size=20), st.sampled_from(["", "--", "-", "x" * 50_000, "learning_rat"])),
                        anything)
    return weighted((6, known.flatmap(for_option)), (2, path_entry), (1, unknown))


def duplicate_spelling() -> st.SearchStrategy:
    """The same option twice in one file: with and without dashes, or an alias beside its option."""
    with_dashes = st.sampled_from(OPTIONS).map(lambda o: {o.name: o.default, f"--{o.name}": o.default})
    with_alias = st.sampled_from(ALIASES).map(lambda a: {a: 1, alias_targets()[a]: 1}) if ALIASES else st.nothing()
    return with_dashes | with_alias


def config_text(project: Project, system_paths: bool = False) -> st.SearchStrategy:
    """The bytes of a config.json: the base with fuzzed changes, or something that is no config."""
    def render(changes: tuple[list[tuple[str, Any]], dict, dict, list[str]]) -> bytes:
        entries, conflict, duplicates, removed = changes
        config = {key: value for key, value in project.base.items() if key not in removed}
        config.update(conflict)
        config.update(dict(entries))
        text = json.dumps(config, allow_nan=True)
        for key, value in duplicates.items():  # json.dumps cannot write a key twice; splice it in
            text = text[:-1] + (", " if len(text) > 2 else "") + f"{json.dumps(key)}: {json.dumps(value)}" + "}"
        text = re.sub(f'"{DEEP_MARK.pattern}"', lambda match: _nested_text(int(match.group(1))), text)
        return text.encode("utf-8")

    changes = st.tuples(
        st.lists(option_entry(project, system_paths), min_size=1, max_size=3),
        weighted((4, st.just({})), (1, st.sampled_from(CONFLICTS))),
        weighted((9, st.just({})), (1, duplicate_spelling())),
        weighted((6, st.just([])), (1, st.lists(st.sampled_from(sorted(project.base)), max_size=2))),
    ).map(render)
    not_a_config = st.sampled_from([
        b"", b"[]", b'"config"', b"42", b"null", b"{", b"\xff\xfe{}", b'{"model_family": "caf\xe9"}',
        b"[" * 50_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"learning_rate": 1, "learning_rate": 2}',
        b'{"seed": ' + b"9" * 5000 + b"}", b"\x00\x00\x00",
    ])
    return weighted((9, changes), (1, not_a_config))


# --- outcomes ---------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``simpletuner <argv>`` in this process: exit status, stdout, stderr. Any exception but a
    clean exit propagates, which is what fails the example."""
    out, err = io.StringIO(), io.StringIO()
    with time_limit(EXAMPLE_TIMEOUT_S), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_accepted_or_one_clean_line(code: int, err: str, command: str) -> None:
    # what the examples ended in, for `pytest --hypothesis-show-statistics`
    event(f"exit {code}")
    if code == 2:
        event(re.sub(r"(?<!\S)'?/\S+", "PATH", err.split("configuration error: ")[-1])[:50])
    assert code in (0, 2), f"exit status {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"expected one line, got {len(lines)}: {err[:3000]}"
        assert lines[0].startswith(f"simpletuner {command}: configuration error: "), lines[0][:500]
        assert len(lines[0]) <= LONGEST_MESSAGE, f"{len(lines[0])} characters: {lines[0][:300]}"


@FUZZ_SETTINGS
@given(data=st.data())
def test_train_dry_run_accepts_or_fails_cleanly(project: Project, data: st.DataObject) -> None:
    folder = project.fresh_folder()
    config = folder / "config.json"
    config.write_bytes(data.draw(config_text(project, system_paths=True), label="config.json"))
    flags = data.draw(st.lists(st.tuples(st.sampled_from(NUMERIC + CHOICE_OPTIONS).map(lambda o: o.name),
                                         EDGE_STRINGS.filter(lambda s: "\x00" not in s)), max_size=2), label="flags")
    argv = ["train", "--config", str(config), "--dry-run", *(f"--{name}={value}" for name, value in flags)]
    code, _, err = run_cli(argv)
    assert_accepted_or_one_clean_line(code, err, "train")
    shutil.rmtree(folder, ignore_errors=True)


def set_argument(project: Project) -> st.SearchStrategy:
    """One ``--set KEY=VALUE`` as a script would write it."""
    def as_text(value: Any) -> str:
        if isinstance(value, str) and DEEP_MARK.fullmatch(value):
            return _nested_text(int(DEEP_MARK.fullmatch(value).group(1)))
        return value if isinstance(value, str) else json.dumps(value)

    option_set = option_entry(project).map(lambda entry: f"{entry[0]}={as_text(entry[1])}")
    dataset_set = st.tuples(
        st.sampled_from(["dataset.", "dataset.tiny.", "dataset.x.", "text_embeds.", "env.", "dataset..", ""]),
        st.sampled_from(["instance_data_dir", "resolution", "repeats", "caption_strategy", "crop", "id", "type",
                         "TRAINING_NUM_PROCESSES", "TRAINING_NUM_MACHINES", "MIXED_PRECISION", "nonsense", ""]),
        st.one_of(EDGE_STRINGS, st.sampled_from(project.hostile_paths), st.text(max_size=10)),
    ).map(lambda parts: f"{parts[0]}{parts[1]}={parts[2]}")
    return st.one_of(option_set, dataset_set, st.sampled_from(["", "=", "novalue", "=x", "lora_rank"]))


@FUZZ_SETTINGS
@given(data=st.data())
def test_configure_non_interactive_accepts_or_fails_cleanly(project: Project, data: st.DataObject) -> None:
    folder = project.fresh_folder()
    config = folder / "config.json"
    if data.draw(st.booleans(), label="existing config"):
        config.write_bytes(data.draw(config_text(project), label="config.json"))
    settings_ = data.draw(st.lists(set_argument(project), max_size=4), label="--set")
    if data.draw(st.booleans(), label="with a dataset"):
        settings_.append(f"dataset.instance_data_dir={project.root / 'images'}")
    argv = ["configure", str(config), "--non-interactive", *(f"--set={setting}" for setting in settings_)]
    code, _, err = run_cli(argv)
    assert_accepted_or_one_clean_line(code, err, "configure")
    shutil.rmtree(folder, ignore_errors=True)


# --- the real command -------------------------------------------------------------------------------


def test_a_bad_config_through_the_real_command_prints_one_line(tmp_path: Path) -> None:
    """The installed ``simpletuner`` entry point, in a fresh interpreter: one line, exit status 2."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_family": "sd1x", "output_dir": "out", "learning_rate": "inf",
                                  "lora_alpha": "x" * 100_000}), encoding="utf-8")
    script = Path(sys.executable).with_name("simpletuner")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "simpletuner.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "TRAINING_NUM_PROCESSES")}
    result = subprocess.run([*command, "train", "--config", str(config), "--dry-run"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "simpletuner train: configuration error: `--learning_rate` = inf is not a finite number; it must be positive "
        f"({config})"
    ]
    assert result.stdout == ""
