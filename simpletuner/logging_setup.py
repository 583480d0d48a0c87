"""Logging at start-up of every ``simpletuner`` command: one format on stderr, library chatter kept
down, and the third-party warnings known to be harmless hidden unless the level is DEBUG.

Where output goes (documentation/CONFIGURATION.md, "Output streams"): logs, warnings, progress bars and
diagnostic lines go to stderr; stdout carries only what a command was asked to print (the options
listing and ``--json``, the ``--dry-run`` plan, the memory plan), so it can be piped or parsed.

Every known harmless message arrives through :mod:`logging`. A filter on the logger that creates the
record drops it before any handler sees it, whichever handler the library installed for itself (torch,
transformers and diffusers format and print their own records). Each entry says why hiding it loses
nothing; ``SIMPLETUNER_LOG_LEVEL=DEBUG`` shows them all again. Nothing written straight to the stderr
file descriptor is filtered: doing that would hide real crashes of native code along with the noise.

Only the standard library is imported here: the CLI sets logging up before torch is imported.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Libraries that speak only at WARNING (INFO with DEBUG). botocore's DEBUG lines quote request
#: headers, the S3 access key id among them, so they never reach the log.
QUIET_LIBRARIES = ("diffusers", "transformers", "torchao", "accelerate", "bitsandbytes", "PIL",
                   "botocore", "boto3", "s3transfer", "urllib3")


@dataclass(frozen=True)
class HarmlessMessage:
    """A third-party log message that tells a simpletuner user nothing they can or need to act on."""

    #: the logger that emits it (its module's ``__name__``)
    logger: str
    #: a regular expression searched in the formatted message
    pattern: str
    #: why hiding it loses nothing
    why: str


HARMLESS_MESSAGES = (
    HarmlessMessage(
        "torchao", r"^Failed to load .*torchao[/\\]_C\w*\.",
        "torchao's wheel ships native kernels for particular CUDA GPUs and one Python version (mxfp8, "
        "cutlass sm90a); they fail to load elsewhere. simpletuner's torchao presets (int8/fp8/int4) "
        "and optimizers do not call them."),
    HarmlessMessage(
        "torchao.kernel.intmm", r"Detected no triton",
        "triton comes only with CUDA builds of torch; without it torchao's int8 matmul uses torch's own "
        "kernel."),
    HarmlessMessage(
        "torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile",
        "a deprecation notice to torchao's developers about how torchao registers its enums at import; "
        "nothing a user sets changes it."),
    HarmlessMessage(
        "diffusers.quantizers.torchao.torchao_quantizer", r"^Unable to import `torchao` Tensor objects",
        "diffusers looks for tensor classes of older torchao releases, needed only to load checkpoints "
        "that diffusers itself serialized with torchao; simpletuner quantizes after loading."),
    HarmlessMessage(
        "transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to",
        "without torchvision, transformers uses the PIL image processor, which preprocesses images the "
        "same way; simpletuner does not need torchvision."),
    HarmlessMessage(
        "bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional faster CPU 4-bit matmul that bitsandbytes downloads from the Hugging Face Hub; "
        "offline it keeps its built-in kernel, which gives the same results."),
    HarmlessMessage(
        "kernels._internals.hf_hub", r"^Skipping publisher trust check for .* offline mode",
        "the same optional bitsandbytes kernel download, skipped in offline mode."),
)


class HarmlessMessageFilter(logging.Filter):
    """Drops the records of one logger whose message matches one of its harmless patterns."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def hide_harmless_messages() -> None:
    """Attach the filters; calling it again changes nothing (tests and the demo set up logging often)."""
    by_logger: dict[str, list[str]] = {}
    for entry in HARMLESS_MESSAGES:
        by_logger.setdefault(entry.logger, []).append(entry.pattern)
    for name, patterns in by_logger.items():
        library_logger = logging.getLogger(name)
        if not any(isinstance(existing, HarmlessMessageFilter) for existing in library_logger.filters):
            library_logger.addFilter(HarmlessMessageFilter(patterns))


def show_harmless_messages() -> None:
    """Remove the filters again (DEBUG shows everything, even in a process that set up INFO before)."""
    for name in {entry.logger for entry in HARMLESS_MESSAGES}:
        library_logger = logging.getLogger(name)
        for existing in [f for f in library_logger.filters if isinstance(f, HarmlessMessageFilter)]:
            library_logger.removeFilter(existing)


def level_from_environment(default: str = "INFO") -> str:
    """SIMPLETUNER_LOG_LEVEL for the commands that do not read config.env (an unknown value: ``default``)."""
    level = os.environ.get("SIMPLETUNER_LOG_LEVEL", "").strip().upper()
    return level if level in LEVELS else default


def configure_logging(level: str | None = None) -> None:
    """Log to stderr at ``level`` (default: SIMPLETUNER_LOG_LEVEL, else INFO), keep the libraries at
    WARNING (INFO under DEBUG), and hide the harmless messages unless the level is DEBUG."""
    level = (level or level_from_environment()).upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    debug = level == "DEBUG"
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.WARNING)
    if debug:
        show_harmless_messages()
    else:
        hide_harmless_messages()
