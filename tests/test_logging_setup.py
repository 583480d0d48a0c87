"""The known harmless third-party warnings are hidden on every run and shown with
SIMPLETUNER_LOG_LEVEL=DEBUG; other warnings of the same libraries still get through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simpletuner.logging_setup import (HARMLESS_MESSAGES, HarmlessMessageFilter, configure_logging,
                                       level_from_environment, show_harmless_messages)
from tests.training.conftest import project, run_args  # noqa: F401  (the tiny sd1x project fixture)

#: What each library printed on a plain `simpletuner train` before the filters (torchao 0.18, torch 2.13,
#: diffusers 0.42, transformers 5.23, bitsandbytes 0.50, kernels), one sample per filtered logger.
SAMPLES = {
    "torchao": "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
               "Could not load this library: /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-"
               "linux-gnu.so",
    "torchao.kernel.intmm": "Warning: Detected no triton, on systems without Triton certain kernels will not work",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                           "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses is "
                           "deprecated and will be an error in a future release.",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may affect "
                                                      "loading checkpoints serialized with `torchao`",
    "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                                       "`CLIPImageProcessorPil` for backward compatibility.",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 of "
                                     "'kernels-community/quantization-bitsandbytes' is not in the local cache",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                 "because Hugging Face Hub is in offline mode.",
}
#: A piece of each sample that identifies it in a run's output.
MARKERS = ("_C_mxfp8", "Detected no triton", "is an Enum subclass", "Unable to import `torchao` Tensor objects",
           "requires torchvision (not installed)", "gemm_4bit_forward", "Skipping publisher trust check")


class Recorder(logging.Handler):
    """The distinct messages it saw (a record of ``torchao.kernel.intmm`` also reaches ``torchao``'s handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() not in self.messages:
            self.messages.append(record.getMessage())


@pytest.fixture
def recorded():
    """Every record that reaches a handler of the filtered loggers; filters removed afterwards."""
    recorder = Recorder()
    loggers = [logging.getLogger(name) for name in SAMPLES]
    for library_logger in loggers:
        library_logger.addHandler(recorder)
    yield recorder
    for library_logger in loggers:
        library_logger.removeHandler(recorder)
    show_harmless_messages()
    configure_logging("INFO")
    show_harmless_messages()


def emit_samples() -> None:
    for name, message in SAMPLES.items():
        logging.getLogger(name).warning(message)
        logging.getLogger(name).warning("something else went wrong in %s", name)


def test_every_filter_has_a_sample_and_a_reason() -> None:
    assert {entry.logger for entry in HARMLESS_MESSAGES} == set(SAMPLES)
    assert all(len(entry.why) > 40 for entry in HARMLESS_MESSAGES)


def test_harmless_messages_are_dropped_and_other_warnings_kept(recorded: Recorder) -> None:
    configure_logging("INFO")
    configure_logging("INFO")  # twice: still one filter per logger
    assert all(sum(isinstance(f, HarmlessMessageFilter) for f in logging.getLogger(name).filters) == 1
               for name in SAMPLES)
    emit_samples()
    assert recorded.messages == [f"something else went wrong in {name}" for name in SAMPLES]


def test_debug_shows_them_again(recorded: Recorder) -> None:
    configure_logging("INFO")
    configure_logging("DEBUG")
    emit_samples()
    assert [m for m in recorded.messages if not m.startswith("something else")] == list(SAMPLES.values())


def test_the_tools_read_the_level_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMPLETUNER_LOG_LEVEL", "debug")
    assert level_from_environment() == "DEBUG"
    monkeypatch.setenv("SIMPLETUNER_LOG_LEVEL", "loud")
    assert level_from_environment("WARNING") == "WARNING"


# --- a real run through the CLI -------------------------------------------------------------------------


def train_in_subprocess(root: Path, output: str, **environment: str) -> subprocess.CompletedProcess:
    """One step of the tiny sd1x LoRA with a validation image, as a user runs it."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SIMPLETUNER_LAUNCHED", "SIMPLETUNER_LOG_LEVEL")}
    env.update(HF_HUB_OFFLINE="1", **environment)
    argv = run_args(root, output, max_train_steps=1, optimizer="optimi-adamw", validation_prompt="a red circle",
                    validation_num_inference_steps=1, validation_resolution=64)
    result = subprocess.run([str(Path(sys.executable).with_name("simpletuner")), "train", *argv], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow  # a real run in a fresh interpreter: 8 s alone, 20 s on a busy machine
def test_a_training_run_prints_none_of_the_harmless_warnings(project: Path) -> None:  # noqa: F811
    result = train_in_subprocess(project, "quiet")
    assert [marker for marker in MARKERS if marker in result.stderr] == []
    assert "validation images for step 1 written" in result.stderr  # the run's own log lines still show
    assert result.stdout == ""  # a training run's logs and progress go to stderr only


@pytest.mark.slow  # a real run in a fresh interpreter: 8 s alone, 20 s on a busy machine
def test_debug_level_shows_them(project: Path) -> None:  # noqa: F811
    result = train_in_subprocess(project, "debug", SIMPLETUNER_LOG_LEVEL="DEBUG")
    assert [marker for marker in MARKERS if marker not in result.stderr] == []
