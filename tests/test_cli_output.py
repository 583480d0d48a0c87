"""What the ``simpletuner`` commands print: a closed pipe ends them quietly, ``options TERM`` searches
the options table, every argument of the tools has a help text, and results go to stdout while
logs and diagnostics go to stderr."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simpletuner.cli import BROKEN_PIPE_EXIT_STATUS, main
from simpletuner.options import options_by_name

SIMPLETUNER = Path(sys.executable).with_name("simpletuner")


# --- a reader that goes away -------------------------------------------------------------------------


def run_with_closed_stdout(*argv: str) -> subprocess.CompletedProcess:
    """Run ``simpletuner argv`` with a stdout pipe whose reader is gone before the first write, as
    ``| head`` is once it has its lines (deterministic: even a short output meets the closed pipe)."""
    process = subprocess.Popen([str(SIMPLETUNER), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, b"", stderr)


@pytest.mark.parametrize("argv", [["options"], ["options", "--json"], ["options", "ema"], ["options", "--help"],
                                  ["train", "--help"], ["make-demo-dataset", "--help"], ["--help"]],
                         ids=lambda argv: " ".join(argv))
def test_closed_pipe_ends_quietly(argv: list[str]) -> None:
    result = run_with_closed_stdout(*argv)
    assert result.stderr.decode() == ""  # no BrokenPipeError traceback, no "Exception ignored" note
    # 141 (128 + SIGPIPE) as a shell reports a tool that the closed pipe stopped; argparse's --help
    # swallows the failed write itself, so a help text may also end with 0
    expected = (0, 141) if "--help" in argv else (141,)
    assert BROKEN_PIPE_EXIT_STATUS == 141 and result.returncode in expected


# --- simpletuner options TERM -------------------------------------------------------------------------


def test_options_term_prints_each_match_with_its_help(capsys: pytest.CaptureFixture) -> None:
    assert main(["options", "lora_rank"]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    option = options_by_name()["lora_rank"]
    assert blocks[0].startswith(f"--lora_rank  (int, group {option.group})")  # the exact name comes first
    assert option.help.split()[0] in blocks[0]
    assert "    default: 16" in blocks[0] and "    allowed: >= 1" in blocks[0] and "    implemented: yes" in blocks[0]
    assert out.rstrip().endswith(f"{len(blocks) - 1} option(s) match 'lora_rank'.")


def test_options_term_searches_help_texts_aliases_and_marks_unimplemented(capsys: pytest.CaptureFixture) -> None:
    assert main(["options", "checkpointing_steps"]) == 0  # a deprecated alias finds its option
    out = capsys.readouterr().out
    assert out.startswith("--checkpoint_step_interval") and "deprecated aliases: --checkpointing_steps" in out

    assert main(["options", "--json", "Moving AVERAGE"]) == 0  # words of a help text, any case
    rows = json.loads(capsys.readouterr().out)
    expected = [o.name for o in options_by_name().values() if "moving average" in o.help.lower()]
    assert expected and sorted(row["name"] for row in rows) == sorted(expected)

    assert main(["options", "sla_config"]) == 0
    assert "implemented: not yet (setting it to anything but the default is refused)" in capsys.readouterr().out


def test_options_term_shows_which_choices_are_refused_for_now(capsys: pytest.CaptureFixture) -> None:
    assert main(["options", "validation_noise_scheduler"]) == 0
    first = capsys.readouterr().out.split("\n\n")[0]
    assert "    choices: ddim, ddpm, euler, euler-a, unipc, dpm++ (declared, refused for now: perflow)" in first


def test_options_term_without_match_says_so_on_stderr(capsys: pytest.CaptureFixture) -> None:
    assert main(["options", "lerning_rate"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no option matches 'lerning_rate'; did you mean `learning_rate`?" in captured.err


def test_options_help_explains_the_search(capsys: pytest.CaptureFixture) -> None:
    from tests.test_cli import help_output

    out = help_output(["options", "--help"], capsys)
    assert "usage: simpletuner options [-h] [--json] [--write-docs] [TERM]" in out
    assert "TERM matches option names" in out and "simpletuner options ema" in out


def test_options_search_does_not_import_heavy_modules(tmp_path: Path) -> None:
    from tests.test_cli import heavy_modules_after, run_main_code

    heavy, stdout = heavy_modules_after(run_main_code(["options", "mixed_precision"]), cwd=tmp_path)
    assert heavy == [] and "EXIT=0" in stdout


# --- every argument of the tools says what it does ------------------------------------------------------


def parser_of(command: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser a subcommand builds, caught as it parses ``--help``."""
    caught = []
    original = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        caught.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return caught[-1]


@pytest.mark.parametrize("command", ["make-demo-dataset", "make-tiny-model", "options", "demo", "extract-lora",
                                     "merge-lora", "compare-lora"])
def test_every_argument_has_help(command: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    parser = parser_of(command, monkeypatch)
    undocumented = [action.dest for action in parser._actions if not action.help]
    assert undocumented == []


def test_make_demo_dataset_help_and_range(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["make-demo-dataset", "--help"])
    out = capsys.readouterr().out
    assert "caption .txt" in out and "how many images to draw (default 1000)" in out
    assert "width and height of each square image, in pixels (default 64)" in out
    with pytest.raises(SystemExit) as exit:
        main(["make-demo-dataset", "--out", str(tmp_path / "shapes"), "--count", "0"])
    assert exit.value.code == 2 and "argument --count: 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists()


# --- one stream convention: results on stdout, logs and diagnostics on stderr ---------------------------


def test_relaunch_prints_its_command_on_stderr(monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    from simpletuner.options.files import LauncherSettings
    from simpletuner.training import launch

    class FinishedProcess:
        def __init__(self, command, env):
            self.command = command

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FinishedProcess)
    assert launch.relaunch_under_accelerate(LauncherSettings(num_processes=2), ["--seed", "3"]) == 0
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("launch: SIMPLETUNER_LAUNCHED=1 ") and "--num_processes 2" in err


def test_rank_sync_lines_go_to_stderr(capfd) -> None:
    torch = pytest.importorskip("torch")
    from simpletuner.training.distributed import check_rank_sync

    accelerator = argparse.Namespace(num_processes=1, process_index=0)
    digest = check_rank_sync(accelerator, 3, 0.25, [torch.ones(2)])
    out, err = capfd.readouterr()
    assert out == ""
    assert err == f"rank-sync step=3 rank=0 loss=0.25 weights={digest}\n"
