"""The ``simpletuner`` command: help and validation stay torch-free, options listing, --dry-run, launch command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simpletuner.cli import main
from simpletuner.data.config import load_dataset_plan
from simpletuner.options import all_options
from simpletuner.options.files import LauncherSettings
from simpletuner.options.resolve import resolve_run
from simpletuner.training.launch import LAUNCHED_MARKER, accelerate_command, needs_relaunch

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIGS = sorted((REPO_ROOT / "config" / "examples").glob("*/config.json"))
HEAVY_MODULES = ("torch", "diffusers", "transformers")


def heavy_modules_after(code: str, cwd: Path) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; return which heavy modules it imported, and its stdout."""
    probe = (
        "import sys\n"
        f"{code}\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY="), result.stdout
    heavy = [name for name in last[len("HEAVY="):].split(",") if name]
    return heavy, result.stdout


def run_main_code(argv: list[str]) -> str:
    """Code calling ``main(argv)`` that records its exit code whether it returns or raises SystemExit."""
    return (
        "from simpletuner.cli import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('EXIT=' + str(code))"
    )


def help_output(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """What ``main(argv)`` prints on stdout for a ``--help`` request, after checking that argparse
    ended it with exit status 0."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    return capsys.readouterr().out


def write_dataset_config(folder: Path, images: Path) -> tuple[Path, Path]:
    """A multidatabackend.json for ``images`` and a config.json using it, both in ``folder``."""
    dataset_list = folder / "multidatabackend.json"
    dataset_list.write_text(json.dumps([
        {"id": "tiny", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile"},
        {"id": "text-embeds", "dataset_type": "text_embeds", "type": "local", "cache_dir": str(folder / "cache/text")},
    ]), encoding="utf-8")
    config = folder / "config.json"
    (folder / "model").mkdir(exist_ok=True)  # the pre-flight check wants a model it can find; the dry run reads none
    config.write_text(json.dumps({
        "model_family": "sd1x",
        "pretrained_model_name_or_path": str(folder / "model"),
        "output_dir": str(folder / "out"),
        "data_backend_config": str(dataset_list),
        "resolution": 64,
        "resolution_type": "pixel",
        "aspect_bucket_alignment": 8,
        "lora_rank": 4,
        "max_train_steps": 10,
    }), encoding="utf-8")
    return config, dataset_list


# --- torch-free start-up ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=["top", "train"])
def test_help_does_not_import_heavy_modules(tmp_path: Path, argv: list[str]) -> None:
    heavy, stdout = heavy_modules_after(run_main_code(argv), cwd=tmp_path)
    assert heavy == []
    assert "EXIT=0" in stdout
    assert "usage: simpletuner" in stdout


def test_train_help_lists_options_and_marks_unsupported(capsys: pytest.CaptureFixture) -> None:
    out = help_output(["train", "--help"], capsys)
    assert "--learning_rate LEARNING_RATE" in out
    assert "--checkpoint_step_interval CHECKPOINT_STEP_INTERVAL, --checkpointing_steps CHECKPOINT_STEP_INTERVAL" in out
    assert "--dry-run" in out
    unsupported_help = out[out.index("\n  --vae_enable_patch_conv"):]
    assert "[not supported yet]" in unsupported_help[: unsupported_help.index("\n  --", 1)]


def test_config_validation_does_not_import_heavy_modules(tmp_path: Path, tiny_image_folder: Path) -> None:
    config, _ = write_dataset_config(tmp_path, tiny_image_folder)
    code = (
        "from pathlib import Path\n"
        "from simpletuner.options.resolve import resolve_run\n"
        f"run = resolve_run(['--config', {str(config)!r}], environ={{}}, root=Path({str(tmp_path)!r}))\n"
        "print('RANK=' + str(run.config.lora_rank))"
    )
    heavy, stdout = heavy_modules_after(code, cwd=tmp_path)
    assert "RANK=4" in stdout
    assert heavy == []


def test_top_level_usage(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "options", "make-tiny-model", "make-demo-dataset", "demo"):
        assert command in out
    with pytest.raises(SystemExit) as exit:
        main(["trian"])
    assert exit.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


# --- simpletuner options ----------------------------------------------------------------------------


def test_options_json_lists_every_option(capsys: pytest.CaptureFixture) -> None:
    assert main(["options", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == [option.name for option in all_options()]
    for row in rows:
        assert {"name", "group", "type", "default", "choices", "implemented"} <= set(row)
    by_name = {row["name"]: row for row in rows}
    assert by_name["learning_rate"] | {"help": None} == {
        "name": "learning_rate", "group": "optimizer", "type": "float", "default": 0.0001, "choices": None,
        "implemented": True, "required": False, "aliases": [], "help": None,
    }
    assert by_name["model_type"]["choices"] == ["full", "lora"]
    assert by_name["sla_config"]["implemented"] is False
    assert by_name["checkpoint_step_interval"]["aliases"] == ["checkpointing_steps"]


def test_options_plain_listing_marks_unsupported(capsys: pytest.CaptureFixture) -> None:
    assert main(["options"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  --learning_rate ") and "default=0.0001" in line for line in lines)
    assert any(line.startswith("- --sla_config ") for line in lines)
    assert lines[-1] == "('-' = declared but not supported yet)"


# --- simpletuner train --dry-run ----------------------------------------------------------------------


def test_dry_run_prints_config_and_dataset_plan(
    tmp_path: Path, tiny_image_folder: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("ENV", "TRAINING_NUM_PROCESSES", "SIMPLETUNER_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    config, dataset_list = write_dataset_config(tmp_path, tiny_image_folder)
    assert main(["train", "--config", str(config), "--dry-run", "--learning_rate", "0.0005"]) == 0
    out = capsys.readouterr().out
    header = "=== resolved config (values that differ from the defaults) ===\n"
    assert out.startswith(header)
    resolved = json.loads(out[len(header): out.index("\nconfig file:")])
    assert resolved["learning_rate"] == 0.0005
    assert resolved["lora_rank"] == 4
    assert resolved["resolution"] == 64.0
    assert resolved["data_backend_config"] == str(dataset_list)
    assert "optimizer" not in resolved  # only what differs from the defaults
    assert f"config file: {config}" in out
    assert "launcher: 1 process(es), dynamo off" in out
    assert (
        f"  tiny: 6 images used in {tiny_image_folder}, 0 skipped, repeats 0; buckets 64x64: 4, 96x64: 2" in out
    )
    assert f"  text embeds cache: {tmp_path / 'cache/text'}" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_does_not_import_heavy_modules(tmp_path: Path, tiny_image_folder: Path) -> None:
    config, _ = write_dataset_config(tmp_path, tiny_image_folder)
    heavy, stdout = heavy_modules_after(run_main_code(["train", "--config", str(config), "--dry-run"]), cwd=tmp_path)
    assert "EXIT=0" in stdout
    assert "buckets 64x64: 4, 96x64: 2" in stdout
    assert heavy == []


def test_config_error_through_main_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/config.json here
    code = main(["train", "--model_family", "sd1x", "--output_dir", "out", "--learning_rat", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "simpletuner train: configuration error: " in err
    assert "did you mean `learning_rate`?" in err


def test_dataset_error_in_dry_run_exits_2(tmp_path: Path, tiny_image_folder: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config, dataset_list = write_dataset_config(tmp_path, tiny_image_folder)
    entries = json.loads(dataset_list.read_text())
    entries[0]["caption_strategie"] = "filename"
    dataset_list.write_text(json.dumps(entries))
    assert main(["train", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "unknown key 'caption_strategie'; did you mean 'caption_strategy'?" in err


# --- multi-process launch ---------------------------------------------------------------------------


def test_accelerate_command_on_cpu() -> None:
    launcher = LauncherSettings(num_processes=3, accelerate_extra_args=("--gpu_ids", "all"))
    argv = ["--config", "config/x.json", "--lora_rank", "4"]
    command, env = accelerate_command(launcher, argv, has_gpu=False)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "3"
    assert command[command.index("--num_machines") + 1] == "1"
    assert command[command.index("--dynamo_backend") + 1] == "no"
    assert "--multi_gpu" in command
    assert command[command.index("--mixed_precision") + 1] == "no"
    assert command.index("--gpu_ids") < command.index("-m", 3)
    assert command[-len(argv) - 3:] == ["-m", "simpletuner.cli", "train", *argv]
    assert env == {LAUNCHED_MARKER: "1", "ACCELERATE_USE_CPU": "1"}


def test_accelerate_command_on_gpu() -> None:
    command, env = accelerate_command(LauncherSettings(num_processes=2, dynamo_backend="inductor"), [], has_gpu=True)
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--dynamo_backend") + 1] == "inductor"
    assert "--multi_gpu" in command and command[command.index("--mixed_precision") + 1] == "no"
    assert command[-3:] == ["-m", "simpletuner.cli", "train"]
    assert env == {LAUNCHED_MARKER: "1"}


def test_needs_relaunch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAUNCHED_MARKER, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert needs_relaunch(LauncherSettings(num_processes=1)) is False
    assert needs_relaunch(LauncherSettings(num_processes=2)) is True
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a worker started by accelerate
    assert needs_relaunch(LauncherSettings(num_processes=2)) is False
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv(LAUNCHED_MARKER, "1")
    assert needs_relaunch(LauncherSettings(num_processes=2)) is False


# --- shipped examples -----------------------------------------------------------------------------


def test_there_are_example_configs() -> None:
    assert [path.parent.name for path in EXAMPLE_CONFIGS], "config/examples/*/config.json is empty"
    assert "demo" in [path.parent.name for path in EXAMPLE_CONFIGS]


@pytest.mark.parametrize("example", EXAMPLE_CONFIGS, ids=lambda path: path.parent.name)
def test_example_config_resolves_and_validates(example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copy the examples into a scratch repo root, create the image folders they name, and validate.

    Examples use paths relative to the repository root, so the copy keeps the same layout; only the
    image folders (which ``simpletuner demo`` generates) are created. Unknown keys or bad values in
    either the config or its dataset list fail here.
    """
    shutil.copytree(REPO_ROOT / "config" / "examples", tmp_path / "config" / "examples")
    monkeypatch.chdir(tmp_path)
    relative = example.relative_to(REPO_ROOT)
    raw = json.loads((tmp_path / relative).read_text(encoding="utf-8"))
    dataset_list = Path(raw.get("data_backend_config") or raw.get("--data_backend_config"))
    assert dataset_list.is_file(), f"{relative}: data_backend_config {dataset_list} is not inside config/examples"
    for entry in json.loads(dataset_list.read_text(encoding="utf-8")):
        if entry.get("dataset_type", "image") in ("image", "video", "conditioning") and not entry.get("disabled"):
            Path(entry["instance_data_dir"]).mkdir(parents=True, exist_ok=True)

    run = resolve_run(["--config", str(relative)], environ={}, root=tmp_path)
    assert run.warnings == []
    plan = load_dataset_plan(run.config.data_backend_config)
    assert plan.enabled_images, f"{relative}: no enabled image dataset"
