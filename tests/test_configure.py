"""``simpletuner configure``: the wizard in a real pseudo-terminal, the non-interactive mode, and the
questions' derivation from the options table.

The terminal tests spawn the real CLI under pexpect. The wizard prints ``# key: help`` before each
question, so the driver answers by key (Enter keeps the default) instead of counting questions;
options that become implemented later add questions without breaking these tests.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest

from simpletuner.configure.draft import load_draft
from simpletuner.configure.questions import (
    UNSET, Question, dataset_key_help, offered_choices, option_question,
)
from simpletuner.configure.wizard import run_wizard
from simpletuner.data.config import dataset_key_schema
from simpletuner.options import options_by_name
from simpletuner.options.resolve import resolve_run
from simpletuner.options.validation import SUPPORTED_VALUES

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = ("config/config.json", "config/multidatabackend.json", "config/config.env")
CLEAR = "\x15"  # Ctrl-U: clear the text already typed in (the default)
ENTER = "\r"

#: The answers of a small fresh setup (the rest keep their defaults), and the same as --set values.
FRESH_ANSWERS = {
    "model_family": "sd1x" + ENTER,
    "mixed_precision": "no" + ENTER,
    "lora_rank": CLEAR + "4" + ENTER,
    "output_dir": "out" + ENTER,
    "max_train_steps": CLEAR + "10" + ENTER,
    "resolution": CLEAR + "64" + ENTER,
    "resolution_type": "pixel" + ENTER,
    "aspect_bucket_alignment": "8" + ENTER,
    "dataset.instance_data_dir": "images" + ENTER,
    "dataset.repeats": CLEAR + "2" + ENTER,
    "validation_prompt": "a red square" + ENTER,
    "validation_step_interval": "5" + ENTER,
    "checkpoint_step_interval": "5" + ENTER,
    "checkpoints_total_limit": "2" + ENTER,
    "env.TRAINING_NUM_PROCESSES": CLEAR + "1" + ENTER,
}
FRESH_SETTINGS = [
    "model_family=sd1x", "mixed_precision=no", "lora_rank=4", "output_dir=out",
    "max_train_steps=10", "resolution=64", "resolution_type=pixel", "aspect_bucket_alignment=8",
    "dataset.instance_data_dir=images", "dataset.repeats=2", "validation_prompt=a red square",
    "validation_step_interval=5", "checkpoint_step_interval=5", "checkpoints_total_limit=2",
    "env.TRAINING_NUM_PROCESSES=1",
]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "TRAINING_NUM_PROCESSES", "SIMPLETUNER_LOG_LEVEL")}
    # no cursor-position requests: pexpect does not answer them and prompt_toolkit would wait
    env.update(PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return env


def spawn_wizard(cwd: Path, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "simpletuner.cli", "configure", *args], cwd=str(cwd),
                          env=child_env(), encoding="utf-8", timeout=20, dimensions=(40, 120))
    child.delaybeforesend = None  # every send waits for its prompt instead
    child.logfile_read = io.StringIO()  # the whole screen output, for assertions
    return child


def drive(child: pexpect.spawn, answers: dict[str, Any], stop_at: str | None = None) -> list[str]:
    """Answer each question by key (a list answers a repeated question in turn); Enter otherwise.

    Returns the keys asked. With ``stop_at``, returns when that question is on screen, unanswered.
    """
    answers = {key: list(value) if isinstance(value, list) else value for key, value in answers.items()}
    asked = []
    while child.expect([r"\n# ([\w.]+): ", pexpect.EOF]) == 0:
        key = child.match.group(1)
        # wait for the prompt itself: "?" (possibly styled), then the key
        child.expect(r"\?(?:\x1b\[[0-9;]*m)* " + re.escape(key) + r"(?=\s|\x1b)")
        asked.append(key)
        if key == stop_at:
            return asked
        answer = answers.get(key, ENTER)
        child.send(answer.pop(0) if isinstance(answer, list) else answer)
    return asked


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root/config`` (temporary files included, so leftovers show)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "config").rglob("*")) if p.is_file()}


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simpletuner.cli", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def configure_non_interactive(cwd: Path, *settings: str, config: str | None = None) -> subprocess.CompletedProcess:
    args = ["configure", *([config] if config else []), "--non-interactive"]
    for setting in settings:
        args += ["--set", setting]
    return run_cli(cwd, *args)


def written_files(root: Path) -> tuple[dict, list, str]:
    return (json.loads((root / FILES[0]).read_text()), json.loads((root / FILES[1]).read_text()),
            (root / FILES[2]).read_text())


# --- the wizard in a pseudo-terminal ----------------------------------------------------------------


def test_fresh_setup_writes_three_files_that_train_accepts(tmp_path: Path, tiny_image_folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    child = spawn_wizard(tmp_path)
    asked = drive(child, FRESH_ANSWERS)
    child.close()
    output = child.before
    assert child.exitstatus == 0, output
    for key in ("model_family", "model_flavour", "model_type", "lora_rank", "mixed_precision", "dataset.type",
                "dataset.caption_strategy", "report_to", "env.TRAINING_NUM_PROCESSES", "write"):
        assert key in asked
    assert all(options_by_name()[key].implemented for key in asked if key in options_by_name())
    assert "simpletuner train --config config/config.json" in output

    config, datasets, env = written_files(tmp_path)
    assert config["model_family"] == "sd1x" and config["lora_rank"] == 4 and config["resolution"] == 64
    assert config["data_backend_config"] == "config/multidatabackend.json"
    assert datasets[0] == {"id": "images", "type": "local", "instance_data_dir": "images", "repeats": 2}
    assert datasets[1]["dataset_type"] == "text_embeds"
    assert env == "TRAINING_NUM_PROCESSES=1\n"
    assert sorted(snapshot(tmp_path)) == sorted(FILES)  # no temporary files left behind

    monkeypatch.chdir(tmp_path)  # paths inside config files are relative to the working directory
    run = resolve_run(["--config", FILES[0]], environ={}, root=tmp_path)
    assert run.config.checkpoints_total_limit == 2
    dry = run_cli(tmp_path, "train", "--config", "config/config.json", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "images: 6 images used in images, 0 skipped, repeats 2" in dry.stdout
    assert "launcher: 1 process(es)" in dry.stdout

    # the non-interactive mode, given the same answers, writes the same bytes
    twin = tmp_path / "twin"
    (twin / "images").mkdir(parents=True)
    result = configure_non_interactive(twin, *FRESH_SETTINGS)
    assert result.returncode == 0, result.stderr
    assert snapshot(twin) == snapshot(tmp_path)


def write_existing_setup(root: Path) -> dict[str, bytes]:
    """A hand-written setup: a `--` key, an alias, a key the wizard never asks, and a comment in config.env."""
    (root / "images").mkdir(exist_ok=True)
    (root / "config").mkdir()
    (root / FILES[0]).write_text(json.dumps({
        "--model_family": "sd1x", "output_dir": "runs/a", "data_backend_config": "config/multidatabackend.json",
        "checkpointing_steps": 50, "learning_rate": 1e-4, "seed": 1234, "max_train_steps": 100,
        "validation_prompt": "a cat",
    }, indent=4), encoding="utf-8")
    (root / FILES[1]).write_text(json.dumps([
        {"id": "pets", "type": "local", "instance_data_dir": "images", "crop": True},
        {"id": "te", "dataset_type": "text_embeds", "cache_dir": "cache/te"},
    ]), encoding="utf-8")
    (root / FILES[2]).write_text("# launcher\nexport TRAINING_NUM_PROCESSES=1\nSIMPLETUNER_LOG_LEVEL=INFO\n",
                                 encoding="utf-8")
    return snapshot(root)


def test_edit_changes_one_answer_and_preserves_the_rest(tmp_path: Path) -> None:
    before = write_existing_setup(tmp_path)
    child = spawn_wizard(tmp_path, "config/config.json")
    asked = drive(child, {"learning_rate": CLEAR + "0.0005" + ENTER, "env.TRAINING_NUM_PROCESSES": CLEAR + "2" + ENTER})
    child.close()
    assert child.exitstatus == 0, child.before
    assert "datasets" in asked and "dataset.id" not in asked  # the existing dataset was kept, not re-asked

    config = json.loads((tmp_path / FILES[0]).read_text())
    original = json.loads(before[FILES[0]])
    assert config == {**original, "learning_rate": 0.0005}  # spellings (`--model_family`, alias) and order kept
    assert list(config) == list(original)
    assert (tmp_path / FILES[1]).read_bytes() == before[FILES[1]]  # unchanged file: untouched bytes
    assert (tmp_path / FILES[2]).read_text() == "# launcher\nexport TRAINING_NUM_PROCESSES=2\nSIMPLETUNER_LOG_LEVEL=INFO\n"
    assert "simpletuner train --config config/config.json" in child.before
    dry = run_cli(tmp_path, "train", "--config", "config/config.json", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert '"learning_rate": 0.0005' in dry.stdout and "launcher: 2 process(es)" in dry.stdout


def test_an_invalid_setup_is_not_written_and_can_be_corrected(tmp_path: Path, tiny_image_folder: Path) -> None:
    """An output_dir naming an existing file passes the question's type check but not validation: the
    wizard says why, writes nothing, and asks again with the previous answers as defaults."""
    child = spawn_wizard(tmp_path)
    asked = drive(child, {"output_dir": ["images/img0.png" + ENTER, CLEAR + "out" + ENTER],
                          "dataset.instance_data_dir": "images" + ENTER,
                          "lora_rank": [CLEAR + "4" + ENTER, ENTER],
                          "retry": ENTER})
    child.close()
    assert child.exitstatus == 0, child.before
    assert asked.count("lora_rank") == 2 and asked.count("retry") == 1 and asked.count("dataset.id") == 1
    screen = child.logfile_read.getvalue()
    assert "this setup does not validate yet:" in screen
    assert "`--output_dir` 'images/img0.png' exists and is not a folder" in screen
    assert json.loads((tmp_path / FILES[0]).read_text())["lora_rank"] == 4
    assert sorted(snapshot(tmp_path)) == sorted(FILES)


@pytest.mark.parametrize("interrupt_at", ["learning_rate", "write"], ids=["mid-way", "at-the-last-question"])
def test_ctrl_c_leaves_existing_files_byte_identical(tmp_path: Path, interrupt_at: str) -> None:
    """Interrupting after some answers were changed, and at the final question (when the new files are
    already staged beside the old ones), changes nothing and leaves no temporary file."""
    before = write_existing_setup(tmp_path)
    child = spawn_wizard(tmp_path, "config/config.json")
    drive(child, {"model_type": "full" + ENTER, "max_train_steps": CLEAR + "7" + ENTER}, stop_at=interrupt_at)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "cancelled: no file was changed" in child.before
    assert snapshot(tmp_path) == before


# --- non-interactive --------------------------------------------------------------------------------


def test_non_interactive_unknown_key_names_the_closest(tmp_path: Path, tiny_image_folder: Path) -> None:
    result = configure_non_interactive(tmp_path, "model_family=sd1x", "output_dir=out", "learning_rat=1e-4",
                                       "dataset.instance_data_dir=images")
    assert result.returncode == 2
    assert "--set: unknown option `learning_rat`; did you mean `learning_rate`?" in result.stderr
    result = configure_non_interactive(tmp_path, "model_family=sd1x", "output_dir=out",
                                       "dataset.instance_dir=images")
    assert result.returncode == 2
    assert "unknown key 'instance_dir'; did you mean 'instance_data_dir'?" in result.stderr
    result = configure_non_interactive(tmp_path, "env.TRAINING_NUM_PROCESS=2")
    assert "did you mean `env.TRAINING_NUM_PROCESSES`?" in result.stderr
    assert not (tmp_path / "config").exists()  # nothing written, not even the folder


@pytest.mark.parametrize("setting, message", [
    ("lora_rank=four", "`lora_rank` = 'four' is not an integer"),
    ("lora_rank=0", "`--lora_rank` = 0 must be at least 1"),
    ("mixed_precision=fp64", "`mixed_precision` = 'fp64' is not one of"),
    ("dataset.repeats=-1", "key 'repeats' has value -1"),
    ("dataset.instance_data_dir=missing", "'missing', but"),
    ("env.TRAINING_NUM_PROCESSES=0", "must be a whole number of at least 1"),
    ("env.SIMPLETUNER_LOG_LEVEL=LOUD", "SIMPLETUNER_LOG_LEVEL='LOUD'"),  # checked by the launcher's loader
    ("env.TRAINING_NUM_MACHINES=2", "needs TRAINING_MACHINE_RANK"),
    ('distillation_config={"a": 1}', "`--distillation_config` is not supported yet"),
])
def test_non_interactive_bad_value_leaves_files_untouched(tmp_path: Path, setting: str, message: str) -> None:
    before = write_existing_setup(tmp_path)
    result = configure_non_interactive(tmp_path, "learning_rate=2e-4", setting, config="config/config.json")
    assert result.returncode == 2
    assert "simpletuner configure: configuration error:" in result.stderr and message in result.stderr
    assert snapshot(tmp_path) == before


def test_non_interactive_edit_and_dataset_scheme(tmp_path: Path) -> None:
    before = write_existing_setup(tmp_path)
    (tmp_path / "more").mkdir()
    result = configure_non_interactive(
        tmp_path, "model_type=full", "checkpointing_steps=25", "dataset.repeats=3",
        "dataset.extra.instance_data_dir=more", "dataset.extra.caption_strategy=filename", "text_embeds.cache_dir=c/t",
        config="config/config.json")
    assert result.returncode == 0, result.stderr
    config, datasets, env = written_files(tmp_path)
    assert config == {**json.loads(before[FILES[0]]), "checkpointing_steps": 25, "model_type": "full"}
    assert datasets == [
        {"id": "pets", "type": "local", "instance_data_dir": "images", "crop": True, "repeats": 3},
        {"id": "extra", "type": "local", "instance_data_dir": "more", "caption_strategy": "filename"},
        {"id": "te", "dataset_type": "text_embeds", "cache_dir": "c/t"},
    ]
    assert env.encode() == before[FILES[2]]
    # switching to full training removes the LoRA-only keys the file had
    result = configure_non_interactive(tmp_path, "model_type=lora", "lora_rank=8", config="config/config.json")
    assert result.returncode == 0, result.stderr
    result = configure_non_interactive(tmp_path, "model_type=full", config="config/config.json")
    assert result.returncode == 0, result.stderr
    assert "removed `lora_rank`" in result.stdout and "lora_rank" not in written_files(tmp_path)[0]


def test_config_elsewhere_gets_the_process_count_on_the_command_line(tmp_path: Path, tiny_image_folder: Path) -> None:
    result = configure_non_interactive(tmp_path, "model_family=sd1x", "output_dir=out",
                                       "dataset.instance_data_dir=images", "env.TRAINING_NUM_PROCESSES=2",
                                       config="setups/a.json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "setups").iterdir()) == ["a.json", "config.env", "multidatabackend.json"]
    assert json.loads((tmp_path / "setups/a.json").read_text())["data_backend_config"] == "setups/multidatabackend.json"
    assert "TRAINING_NUM_PROCESSES=2 simpletuner train --config setups/a.json" in result.stdout
    result = configure_non_interactive(tmp_path, "model_family=sd1x", "output_dir=out",
                                       "dataset.instance_data_dir=images", config="config/portrait/config.json")
    assert "simpletuner train --env portrait" in result.stdout


def test_without_a_terminal_the_wizard_points_at_non_interactive(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "simpletuner.cli", "configure"], cwd=tmp_path, env=child_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--non-interactive" in result.stderr


def test_configure_shim_and_help_stay_light(tmp_path: Path) -> None:
    probe = ("import sys\nfrom simpletuner.cli import main\ntry:\n    main(['configure', '--help'])\n"
             "except SystemExit:\n    pass\nprint('HEAVY=' + ','.join(m for m in ('torch', 'diffusers', 'questionary') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=child_env(), capture_output=True,
                            text=True, timeout=60)
    assert "usage: simpletuner configure" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY="
    shim = subprocess.run([sys.executable, str(REPO_ROOT / "configure.py"), "--help"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert shim.returncode == 0 and "--non-interactive" in shim.stdout


# --- questions come from the options table and the dataset schema -------------------------------------


class ScriptedUI:
    """Answers every question with its default (or a given answer) and records what was asked."""

    def __init__(self, answers: dict[str, Any] | None = None):
        self.answers = answers or {}
        self.questions: list[Question] = []

    def ask(self, question: Question) -> Any:
        self.questions.append(question)
        return question.convert(self.answers.get(question.key, question.default))

    def heading(self, title: str) -> None:
        pass

    def say(self, text: str) -> None:
        pass


def test_every_question_is_derived_from_the_table_or_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ui = ScriptedUI({"output_dir": "out", "dataset.instance_data_dir": "."})
    draft = load_draft(None)
    run_wizard(ui, draft)
    table, schema, helps = options_by_name(), dataset_key_schema(), dataset_key_help()
    asked = {q.key: q for q in ui.questions}
    for key, question in asked.items():
        if key in table:
            option = table[key]
            assert option.implemented, key
            assert question.help.startswith(option.help)
            if option.choices:
                allowed = {str(c) for c in option.choices} | {UNSET}
                assert set(question.choices) <= allowed, key
                assert not set(question.choices) - {UNSET} - {str(v) for v in SUPPORTED_VALUES.get(key, option.choices)}
        elif key.startswith("dataset."):
            assert key[len("dataset."):] in schema and question.help == helps[key[len("dataset."):]]
    assert asked["mixed_precision"].choices == offered_choices(table["mixed_precision"])
    assert asked["lora_rank"].default == str(table["lora_rank"].default)
    # accepting every default writes only what was typed, plus what a setup needs
    assert draft.config == {"model_family": "sd1x", "output_dir": "out"}


def test_option_question_kinds() -> None:
    assert option_question("use_ema", False).kind == "confirm"
    rank = option_question("lora_rank", 8)
    assert (rank.kind, rank.default, rank.convert("12"), rank.convert("")) == ("text", "8", 12, 16)
    assert rank.check("x") == "answer: `lora_rank` = 'x' is not an integer"
    seed = option_question("seed", None)
    assert (seed.default, seed.convert("")) == ("", None)
    with pytest.raises(ValueError, match="only asks implemented options"):
        option_question("distillation_config", None)


def test_s3_dataset_questions_and_switching_back_to_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    answers = {"output_dir": "out", "dataset.type": "aws", "dataset.aws_bucket_name": "photos",
               "dataset.aws_data_prefix": "cats/", "dataset.aws_region_name": "eu-west-1",
               "dataset.aws_endpoint_url": "http://127.0.0.1:9000", "dataset.caption_strategy": "instanceprompt",
               "dataset.instance_prompt": "a photo of a cat"}
    draft = load_draft(None)
    run_wizard(ScriptedUI(answers), draft)
    assert draft.settle() == []
    assert draft.image_entries() == [{
        "id": "images", "type": "aws", "aws_bucket_name": "photos", "aws_data_prefix": "cats/",
        "aws_region_name": "eu-west-1", "aws_endpoint_url": "http://127.0.0.1:9000",
        "caption_strategy": "instanceprompt", "instance_prompt": "a photo of a cat"}]
    result = configure_non_interactive(tmp_path, "model_family=sd2x", "output_dir=out", "dataset.type=aws",
                                       "dataset.aws_bucket_name=photos", "dataset.aws_region_name=eu-west-1")
    assert result.returncode == 0, result.stderr
    (tmp_path / "pics").mkdir()
    result = configure_non_interactive(tmp_path, "dataset.type=local", "dataset.instance_data_dir=pics")
    assert result.returncode == 0, result.stderr
    assert "removed 'aws_bucket_name' from dataset 'images'" in result.stdout
    assert written_files(tmp_path)[1][0] == {"id": "images", "type": "local", "instance_data_dir": "pics"}
