"""``simpletuner configure``: the wizard in a real pseudo-terminal, the non-interactive mode, and the
questions' derivation from the options table.

The terminal tests spawn the real CLI under pexpect. The wizard prints ``# key: help`` before each
question, so the driver answers by key (Enter keeps the default) instead of counting questions;
options that become implemented later add questions without breaking these tests. Esc goes back a
question and Ctrl-O shows the advanced questions (from the current section on); the tests press
them like any answer.
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
from simpletuner.configure.machine import Machine, detect_machine
from simpletuner.configure.navigation import GoBack, Navigation, WizardSession
from simpletuner.configure.questions import (
    UNSET, Question, dataset_key_help, offered_choices, option_question,
)
from simpletuner.configure.wizard import SECTIONS, run_wizard
from simpletuner.data.config import dataset_key_schema
from simpletuner.options import options_by_name
from simpletuner.options.resolve import resolve_run
from simpletuner.options.validation import SUPPORTED_VALUES
from tests.scripted_ui import ScriptedUI

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = ("config/config.json", "config/multidatabackend.json", "config/config.env")
CLEAR = "\x15"  # Ctrl-U: clear the text already typed in (the default)
ENTER = "\r"
BACK = "\x1b"  # Esc: the previous question
ADVANCED = "\x0f"  # Ctrl-O: show (or hide) the advanced questions from this section on

#: The answers of a small fresh setup with every advanced question shown (the rest keep their
#: defaults), and the same as --set values. The model is a local folder so that --dry-run, which
#: checks the model can be loaded, passes offline.
FRESH_ANSWERS = {
    "model_family": [ADVANCED, "sd1x" + ENTER],
    "pretrained_model_name_or_path": "model" + ENTER,
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
    "model_family=sd1x", "pretrained_model_name_or_path=model", "mixed_precision=no", "lora_rank=4", "output_dir=out",
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


def drive(child: pexpect.spawn, answers: dict[str, Any], stop_at: str | None = None,
          prompts: list[tuple[str, str]] | None = None) -> list[str]:
    """Answer each question by key (a list answers a repeated question in turn); Enter otherwise.

    Returns the keys asked; ``prompts`` receives each question's key and what its prompt showed. With
    ``stop_at``, returns when that question is on screen, unanswered.
    """
    answers = {key: list(value) if isinstance(value, list) else value for key, value in answers.items()}
    asked = []
    while child.expect([r"\n# ([\w.]+): ", pexpect.EOF]) == 0:
        key = child.match.group(1)
        shown = wait_for_prompt(child, key)
        if prompts is not None:
            prompts.append((key, shown))
        asked.append(key)
        if key == stop_at:
            return asked
        answer = answers.get(key, ENTER)
        child.send((answer.pop(0) if answer else ENTER) if isinstance(answer, list) else answer)
    return asked


def wait_for_prompt(child: pexpect.spawn, key: str) -> str:
    """Wait until the prompt of ``key`` is on screen ("?", possibly styled, then the key) and its
    footer below it; return what the prompt shows (the default, the choices) up to the footer."""
    child.expect(r"\?(?:\x1b\[[0-9;]*m)* " + re.escape(key) + r"(?=\s|\x1b)")
    child.expect("Ctrl-C: quit, nothing written")
    return child.before


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
    (tmp_path / "model").mkdir()
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
    assert config["resume_from_checkpoint"] == "latest"  # running the same command again resumes
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
    (twin / "model").mkdir()
    result = configure_non_interactive(twin, *FRESH_SETTINGS)
    assert result.returncode == 0, result.stderr
    assert snapshot(twin) == snapshot(tmp_path)


def write_existing_setup(root: Path) -> dict[str, bytes]:
    """A hand-written setup: a `--` key, an alias, a key the wizard never asks, and a comment in config.env."""
    (root / "images").mkdir(exist_ok=True)
    (root / "model").mkdir()  # a local model folder: --dry-run checks the model can be loaded (offline here)
    (root / "config").mkdir()
    (root / FILES[0]).write_text(json.dumps({
        "--model_family": "sd1x", "pretrained_model_name_or_path": "model", "output_dir": "runs/a", "data_backend_config": "config/multidatabackend.json",
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


def test_edit_changes_one_answer_and_preserves_the_rest(tmp_path: Path, tiny_image_folder: Path) -> None:
    before = write_existing_setup(tmp_path)
    child = spawn_wizard(tmp_path, "config/config.json")
    asked = drive(child, {"learning_rate": CLEAR + "0.0005" + ENTER, "checkpoint_step_interval": [ADVANCED, ENTER],
                          "env.TRAINING_NUM_PROCESSES": CLEAR + "2" + ENTER})
    child.close()
    assert child.exitstatus == 0, child.before
    assert "datasets" in asked and "dataset.id" not in asked  # the existing dataset was kept, not re-asked
    assert "report_to" in asked and "lora_dropout" not in asked  # advanced from the Checkpoints section on

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


def test_edit_keeps_a_list_of_trackers_set_in_the_file(tmp_path: Path, tiny_image_folder: Path) -> None:
    write_existing_setup(tmp_path)
    config = json.loads((tmp_path / FILES[0]).read_text())
    (tmp_path / FILES[0]).write_text(json.dumps({**config, "report_to": "tensorboard,wandb"}, indent=4))
    child = spawn_wizard(tmp_path, "config/config.json")
    # the tracker question is an advanced one; Enter everywhere else keeps what the file holds
    asked = drive(child, {"checkpoint_step_interval": [ADVANCED, ENTER]})
    child.close()
    assert child.exitstatus == 0, child.before
    assert "report_to" in asked
    assert json.loads((tmp_path / FILES[0]).read_text())["report_to"] == "tensorboard,wandb"


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
    assert asked.count("lora_rank") == 2 and asked.count("retry") == 1
    # the dataset was answered once; the second time round it is in the draft, offered by the datasets menu
    assert asked.count("dataset.instance_data_dir") == 1 and asked.count("datasets") == 1
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


#: Answers that finish a new sd1x LoRA setup on the essential path (Enter everywhere else).
ESSENTIAL_ANSWERS = {
    "output_dir": "out" + ENTER,
    "dataset.instance_data_dir": "images" + ENTER,
}
#: Questions that never apply to an sd1x LoRA (other families' options, LyCORIS and SingLoRA options
#: of a standard LoRA, text encoders it does not have, quantization details of an unquantized model,
#: block swap of transformer families, group-offload details while group offload is off).
NOT_FOR_SD1X_LORA = ("flux_lora_target", "lycoris_config", "init_lokr_norm", "singlora_ramp_up_steps",
                     "text_encoder_2_precision", "text_encoder_3_precision", "text_encoder_4_precision",
                     "quantize_via", "quantization_config", "quantize_activations", "base_model_default_dtype",
                     "musubi_blocks_to_swap", "musubi_block_swap_device", "unet_attention_slice", "group_offload_type",
                     "group_offload_blocks_per_group", "ramtorch_target_modules")


def shown_default(prompts: list[tuple[str, str]], key: str, occurrence: int) -> str:
    """The text a prompt showed after its key (the default typed in, or a select's hint), unstyled."""
    shown = [text for asked, text in prompts if asked == key][occurrence]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).strip().splitlines()[0].strip()


def on_screen(text: str) -> str:
    """A pattern for ``text`` as the terminal draws it: a redrawn line may move over a space
    (``ESC [ C``) instead of printing it."""
    return r"(?: |\x1b\[\d*C)".join(re.escape(word) for word in text.split(" "))


def test_essential_sd1x_lora_takes_at_most_20_answers(tmp_path: Path, tiny_image_folder: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A first LoRA on the essential path: about 15 answers (Enter for most), the defaults fit sd1x and
    this machine, and the files validate and resume the run when started again."""
    child = spawn_wizard(tmp_path)
    asked = drive(child, {**ESSENTIAL_ANSWERS, "validation_prompt": "a red square" + ENTER,
                          "validation_step_interval": "50" + ENTER, "checkpoint_step_interval": "50" + ENTER})
    child.close()
    assert child.exitstatus == 0, child.before
    assert len(asked) <= 20, asked
    assert asked[:4] == ["model_family", "model_flavour", "model_type", "lora_rank"] and asked[-1] == "write"
    assert not set(asked) & {*NOT_FOR_SD1X_LORA, "lora_dropout", "optimizer", "dataset.id", "report_to"}
    screen = child.logfile_read.getvalue()
    assert "Esc: back" in screen and "Ctrl-O: show advanced questions" in screen

    config, datasets, _ = written_files(tmp_path)
    assert (config["resolution"], config["resolution_type"]) == (512, "pixel")  # sd1x's native size, as the quickstart
    assert config["resume_from_checkpoint"] == "latest"
    no_accelerator = detect_machine().accelerator is None
    assert config.get("mixed_precision") == ("no" if no_accelerator else None)  # bf16 is the table's default
    monkeypatch.chdir(tmp_path)
    run = resolve_run(["--config", FILES[0]], environ={}, root=tmp_path)
    assert run.config.resume_from_checkpoint == "latest" and run.config.resolution == 512
    assert run.config.validation_step_interval == 50 and run.config.checkpoint_step_interval == 50


def test_back_key_returns_to_the_previous_question_with_its_answer(tmp_path: Path, tiny_image_folder: Path) -> None:
    """Esc at mixed_precision shows lora_rank again with the 4 typed before; Esc at the final `write`
    question goes back into the wizard."""
    prompts: list[tuple[str, str]] = []
    child = spawn_wizard(tmp_path)
    asked = drive(child, {**ESSENTIAL_ANSWERS, "lora_rank": [CLEAR + "4" + ENTER, ENTER],
                          "mixed_precision": [BACK, ENTER], "checkpoint_step_interval": ["7" + ENTER, ENTER],
                          "write": [BACK, ENTER]}, prompts=prompts)
    child.close()
    assert child.exitstatus == 0, child.before
    assert asked[3:7] == ["lora_rank", "mixed_precision", "lora_rank", "mixed_precision"]
    assert asked[-4:] == ["checkpoint_step_interval", "write", "checkpoint_step_interval", "write"]
    assert shown_default(prompts, "lora_rank", 1) == "4"
    assert shown_default(prompts, "checkpoint_step_interval", 1) == "7"
    config = written_files(tmp_path)[0]
    assert (config["lora_rank"], config["checkpoint_step_interval"]) == (4, 7)


def test_going_back_past_a_branch_asks_that_branch_again(tmp_path: Path, tiny_image_folder: Path) -> None:
    """Back to model_type, answered `full` this time: the LoRA questions are not asked again and the
    rank given for the LoRA is not written."""
    child = spawn_wizard(tmp_path)
    asked = drive(child, {**ESSENTIAL_ANSWERS, "model_type": [ENTER, "full" + ENTER],
                          "lora_rank": [CLEAR + "4" + ENTER, BACK], "mixed_precision": [BACK, ENTER]})
    child.close()
    assert child.exitstatus == 0, child.before
    assert asked[:8] == ["model_family", "model_flavour", "model_type", "lora_rank", "mixed_precision", "lora_rank",
                         "model_type", "mixed_precision"]
    assert asked.count("lora_rank") == 2
    config = written_files(tmp_path)[0]
    assert config["model_type"] == "full" and "lora_rank" not in config


def test_out_of_range_answer_is_refused_at_the_question(tmp_path: Path, tiny_image_folder: Path) -> None:
    """lora_rank -3 is refused where it is typed, with the table's range, and asked again at once."""
    child = spawn_wizard(tmp_path)
    drive(child, {}, stop_at="lora_rank")
    child.send(CLEAR + "-3" + ENTER)
    child.expect(on_screen("`--lora_rank` = -3 must be at least 1"))
    child.send(CLEAR + "x" + ENTER)
    child.expect(on_screen("`lora_rank` = 'x' is not an integer"))
    child.send(CLEAR + "8" + ENTER)
    asked = drive(child, ESSENTIAL_ANSWERS)
    child.close()
    assert child.exitstatus == 0, child.before
    assert asked[0] == "mixed_precision"  # the next question: lora_rank was not asked again from the start
    assert written_files(tmp_path)[0]["lora_rank"] == 8


def test_advanced_key_shows_the_advanced_questions(tmp_path: Path, tiny_image_folder: Path) -> None:
    """Ctrl-O at lora_rank replays the section with its advanced questions: lora_dropout is asked and
    written, the answers given before stay, and the footer offers to hide them again."""
    prompts: list[tuple[str, str]] = []
    child = spawn_wizard(tmp_path)
    asked = drive(child, {**ESSENTIAL_ANSWERS, "lora_rank": [ADVANCED, CLEAR + "4" + ENTER],
                          "lora_dropout": CLEAR + "0.2" + ENTER}, prompts=prompts)
    child.close()
    assert child.exitstatus == 0, child.before
    first_rank = asked.index("lora_rank")
    assert "lora_dropout" not in asked[:first_rank] and "lora_dropout" in asked
    assert asked[first_rank + 1] == "pretrained_model_name_or_path"  # the section's first advanced question
    assert {"optimizer", "report_to", "dataset.repeats"} <= set(asked)  # and those of the sections after it
    assert "Ctrl-O: hide advanced questions" in dict(prompts)["lora_dropout"]
    config = written_files(tmp_path)[0]
    assert (config["lora_rank"], config["lora_dropout"]) == (4, 0.2)


def test_sd1x_lora_never_asks_what_does_not_apply(tmp_path: Path, tiny_image_folder: Path) -> None:
    """Even with every advanced question shown, an sd1x LoRA is not asked about other families,
    LyCORIS or SingLoRA, a second text encoder, quantization details or GPU-only memory options."""
    child = spawn_wizard(tmp_path)
    asked = drive(child, {**ESSENTIAL_ANSWERS, "model_family": [ADVANCED, ENTER]})
    child.close()
    assert child.exitstatus == 0, child.before
    assert {"lora_dropout", "use_dora", "base_model_precision", "text_encoder_1_precision", "gradient_checkpointing",
            "vae_enable_tiling"} <= set(asked)
    assert not set(asked) & set(NOT_FOR_SD1X_LORA)
    if not detect_machine().cuda:
        assert not set(asked) & {"ramtorch", "disable_tf32", "group_offload_use_stream"}
    if detect_machine().accelerator is None:
        assert not set(asked) & {"enable_group_offload", "enable_model_cpu_offload", "memory_budget"}


def test_flux_lora_asks_which_flux_modules_get_lora(tmp_path: Path) -> None:
    child = spawn_wizard(tmp_path)
    asked = drive(child, {"model_family": "flux" + ENTER}, stop_at="flux_lora_target")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert asked == ["model_family", "model_flavour", "model_type", "lora_rank", "flux_lora_target"]


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
    ('sla_config={"a": 1}', "`--sla_config` is not supported yet"),
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


def test_non_interactive_set_null_unsets_every_kind_of_key(tmp_path: Path) -> None:
    """``null`` means unset for string options and string dataset keys too, as it does in config.json;
    ``none`` stays a word a string option can hold."""
    write_existing_setup(tmp_path)
    result = configure_non_interactive(tmp_path, "resume_from_checkpoint=latest", "report_to=none",
                                       "dataset.caption_strategy=filename", config="config/config.json")
    assert result.returncode == 0, result.stderr
    config, datasets, _ = written_files(tmp_path)
    assert (config["resume_from_checkpoint"], config["report_to"]) == ("latest", "none")
    assert datasets[0]["caption_strategy"] == "filename"
    result = configure_non_interactive(tmp_path, "resume_from_checkpoint=null", "seed= null ",
                                       "dataset.caption_strategy=null", config="config/config.json")
    assert result.returncode == 0, result.stderr
    config, datasets, _ = written_files(tmp_path)
    assert "resume_from_checkpoint" not in config and "seed" not in config and config["report_to"] == "none"
    assert "caption_strategy" not in datasets[0]
    assert "null" not in (tmp_path / FILES[0]).read_text() + (tmp_path / FILES[1]).read_text()


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


def advanced_session(machine: Machine = Machine()) -> WizardSession:
    """A session that shows every section's advanced questions, on ``machine`` (a CPU by default)."""
    return WizardSession(advanced_sections={title for title, _ in SECTIONS}, machine_override=machine)


def test_every_question_is_derived_from_the_table_or_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ui = ScriptedUI({"output_dir": "out", "dataset.instance_data_dir": "."})
    draft = load_draft(None)
    run_wizard(ui, draft, advanced_session())
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
    # accepting every default writes what was typed, plus the defaults that fit a new sd1x setup on a CPU
    assert draft.config == {"model_family": "sd1x", "mixed_precision": "no", "output_dir": "out", "resolution": 512,
                            "resolution_type": "pixel", "resume_from_checkpoint": "latest"}


class RewindingUI(ScriptedUI):
    """Sets up a flux LoRA (rank 4) up to the dataset folder, then presses Esc until it is back at
    model_family, picks sd1x there and keeps every default after that."""

    def __init__(self) -> None:
        super().__init__({"model_family": "flux", "lora_rank": "4", "output_dir": "out"})
        self.rewinding = self.rewound = False

    def ask(self, question: Question, navigation: Navigation | None = None) -> Any:
        if question.key == "dataset.instance_data_dir" and not self.rewound:
            self.rewinding = True
        if self.rewinding and question.key != "model_family":
            raise GoBack()
        if self.rewinding:
            self.rewinding, self.rewound, self.answers = False, True, {"model_family": "sd1x",
                                                                      "dataset.instance_data_dir": "."}
        return super().ask(question, navigation)


def test_going_back_keeps_changed_answers_and_refits_accepted_defaults(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """After going back from flux to sd1x, the rank typed for flux is still the default, while the
    resolution accepted for flux (its 1024) becomes sd1x's 512."""
    monkeypatch.chdir(tmp_path)
    ui, draft = RewindingUI(), load_draft(None)
    run_wizard(ui, draft, WizardSession(machine_override=Machine()))
    defaults = {}
    for question in ui.questions:
        defaults.setdefault(question.key, []).append(question.default)
    assert defaults["resolution"][0] == "1024" and defaults["resolution"][-1] == "512"
    assert defaults["lora_rank"][-1] == "4" and "flux_lora_target" in defaults
    assert defaults["model_family"][-1] == "flux"  # the question gone back to shows the answer given
    assert (draft.typed("model_family"), draft.typed("lora_rank"), draft.typed("resolution")) == ("sd1x", 4, 512)
    assert not draft.has("flux_lora_target")


def test_option_question_kinds() -> None:
    assert option_question("use_ema", False).kind == "confirm"
    rank = option_question("lora_rank", 8)
    assert (rank.kind, rank.default, rank.convert("12"), rank.convert("")) == ("text", "8", 12, 16)
    assert rank.check("x") == "answer: `lora_rank` = 'x' is not an integer"
    seed = option_question("seed", None)
    assert (seed.default, seed.convert("")) == ("", None)
    with pytest.raises(ValueError, match="only asks implemented options"):
        option_question("sla_config", None)


def test_s3_dataset_questions_and_switching_back_to_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    answers = {"output_dir": "out", "dataset.type": "aws", "dataset.aws_bucket_name": "photos",
               "dataset.aws_data_prefix": "cats/", "dataset.aws_region_name": "eu-west-1",
               "dataset.aws_endpoint_url": "http://127.0.0.1:9000", "dataset.caption_strategy": "instanceprompt",
               "dataset.instance_prompt": "a photo of a cat"}
    draft = load_draft(None)
    run_wizard(ScriptedUI(answers), draft, advanced_session())
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
