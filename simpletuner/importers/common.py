"""What every importer produces: our options, our dataset entries, sample prompts, and the list of
settings that had no counterpart (each with the reason), so nothing the user wrote disappears
silently.

Torch-free: importing a config is a file-to-file translation that runs before anything heavy loads.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpletuner.options import ConfigError


class ImportConfigError(ConfigError):
    """A file that cannot be imported; the message names the file, the key and what to do."""


@dataclass(frozen=True)
class Unmapped:
    """One setting of the source file that the import could not carry over."""

    key: str
    value: Any
    reason: str


@dataclass(frozen=True)
class SamplePrompt:
    """A validation prompt with the settings the source tool let each prompt carry.

    ``None`` means "use the run's setting" (``--validation_seed``, ``--validation_guidance``, ...).
    """

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None

    def as_library_entry(self) -> str | dict[str, Any]:
        """The user prompt library value: a plain string when nothing but the prompt is set."""
        extras = {name: value for name, value in (
            ("negative_prompt", self.negative_prompt), ("seed", self.seed), ("steps", self.steps),
            ("guidance", self.guidance), ("width", self.width), ("height", self.height)) if value is not None}
        return {"prompt": self.prompt, **extras} if extras else self.prompt


@dataclass
class ImportedConfig:
    """The translation of one source file, before it is checked and written.

    Attributes:
        source_format: ``kohya``, ``ai-toolkit`` or ``onetrainer``.
        options: our option name -> value, as ``config.json`` will hold them.
        datasets: our ``multidatabackend.json`` entries (image datasets; the writer adds the
            text-embeds entry).
        prompts: sample prompts; the writer puts them in a user prompt library.
        unmapped: the source settings that have no counterpart here.
        notes: decisions worth telling the user (a default we picked, a folder we expanded).
    """

    source_format: str
    options: dict[str, Any] = field(default_factory=dict)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[SamplePrompt] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, key: str, value: Any, reason: str) -> None:
        """Record a source setting that was not carried over, and why."""
        self.unmapped.append(Unmapped(key, value, reason))

    def set(self, name: str, value: Any) -> None:
        """Set one of our options (the last source key that maps onto it wins)."""
        self.options[name] = value


def is_set(value: Any) -> bool:
    """Whether a source value says something (empty strings and nulls are a tool's "unset";
    ``False`` and ``0`` are real values)."""
    return value is not None and not (isinstance(value, (str, list, dict)) and not value)


# --- kohya-style sample prompt lines: "a cat --n blurry --w 512 --h 768 --d 42 --l 7 --s 28" ---------

_PROMPT_FLAG = re.compile(r"\s--(\w+)\s*")


def parse_prompt_line(line: str, where: str) -> SamplePrompt | None:
    """A sample prompt with kohya's inline flags (``--n`` negative, ``--w``/``--h`` size, ``--d``
    seed, ``--l`` guidance, ``--s`` steps), which ai-toolkit reads too. Unknown flags raise, since a
    dropped setting would change what the samples show; blank and ``#`` lines give None."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = _PROMPT_FLAG.split(" " + text)
    prompt = parts[0].strip()
    values: dict[str, Any] = {}
    for flag, raw in zip(parts[1::2], parts[2::2]):
        raw = raw.strip()
        field_name, convert = _PROMPT_FLAGS.get(flag, (None, None))
        if field_name is None:
            raise ImportConfigError(f"{where}: prompt {prompt[:60]!r} has flag `--{flag}`, which is not one of "
                               f"{sorted(_PROMPT_FLAGS)}; remove it or write it as one of those")
        try:
            values[field_name] = convert(raw)
        except ValueError:
            raise ImportConfigError(f"{where}: prompt {prompt[:60]!r}: flag `--{flag}` has value {raw!r}; "
                               f"expected {'a number' if convert is not str else 'text'}") from None
    return SamplePrompt(prompt=prompt, **values)


def _whole(raw: str) -> int:
    return int(float(raw))


_PROMPT_FLAGS: dict[str, tuple[str, Any]] = {
    "n": ("negative_prompt", str), "w": ("width", _whole), "h": ("height", _whole), "d": ("seed", _whole),
    "seed": ("seed", _whole), "l": ("guidance", float), "cfg": ("guidance", float), "s": ("steps", _whole),
    "steps": ("steps", _whole), "neg": ("negative_prompt", str), "width": ("width", _whole),
    "height": ("height", _whole),
}


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; an error naming the file when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ImportConfigError(f"{what} {str(path)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ImportConfigError(f"{what} {str(path)!r} cannot be read ({error})") from None


def shell_words(text: str, where: str) -> list[str]:
    """The words of a shell command line: comments and backslash line continuations removed."""
    joined = re.sub(r"\\\r?\n", " ", text)
    lines = [line for line in joined.splitlines() if not line.lstrip().startswith("#")]
    try:
        return shlex.split(" ".join(lines), comments=True)
    except ValueError as error:
        raise ImportConfigError(f"{where}: cannot split the command line ({error}); check the quotes") from None


def dataset_id(name: str, taken: set[str]) -> str:
    """A dataset id from a folder or concept name: filename-safe, unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "dataset"
    candidate, number = base, 2
    while candidate in taken:
        candidate, number = f"{base}-{number}", number + 1
    taken.add(candidate)
    return candidate


# --- vocabularies the tools share ------------------------------------------------------------------

#: Optimizer names of kohya / ai-toolkit / OneTrainer (lower case) -> ours.
OPTIMIZERS = {
    "adamw": "optimi-adamw", "adam": "optimi-adam", "adamw8bit": "bnb-adamw8bit", "adam8bit": "bnb-adam8bit",
    "pagedadamw8bit": "bnb-adamw8bit-paged", "pagedadamw": "bnb-adamw-paged", "lion": "optimi-lion",
    "lion8bit": "bnb-lion8bit", "pagedlion8bit": "bnb-lion8bit-paged", "prodigy": "prodigy",
    "adamw_adv": "optimi-adamw", "sgd": "optimi-sgd", "ademamix": "bnb-ademamix", "ademamix8bit": "bnb-ademamix8bit",
    "schedulefree_adamw": "adamw_schedulefree", "adamwschedulefree": "adamw_schedulefree",
}

#: Learning-rate schedule names (lower case) -> ours.
LR_SCHEDULERS = {
    "constant": "constant", "constant_with_warmup": "constant_with_warmup", "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts", "linear": "linear", "polynomial": "polynomial",
}

#: Sampler names of the tools' sample settings (lower case) -> our ``--validation_noise_scheduler``.
SAMPLERS = {
    "ddim": "ddim", "ddpm": "ddpm", "euler": "euler", "euler_a": "euler-a", "k_euler": "euler",
    "k_euler_a": "euler-a", "dpmsolver++": "dpm++", "dpmsolver": "dpm++", "dpmsingle": "dpm++", "unipc": "unipc",
    "dpm++": "dpm++", "euler_ancestral": "euler-a", "flowmatch": "euler", "euler_a_ancestral": "euler-a",
}

#: Trackers (lower case) -> ``--report_to``.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "all": "all", "comet_ml": "comet_ml"}


def lookup(table: dict[str, str], value: Any) -> str | None:
    """``value``'s entry in one of the vocabularies above (case and ``-`` / ``_`` do not matter)."""
    if not isinstance(value, str):
        return None
    key = value.strip().lower()
    return table.get(key) or table.get(key.replace("-", "_")) or table.get(key.replace("_", ""))


def family_from_model_name(name: str) -> str | None:
    """Our model family guessed from a model path or hub id, for tools whose config does not say."""
    lowered = name.lower().replace("-", "").replace("_", "")
    for words, family in ((("flux",), "flux"), (("sd3", "stablediffusion3"), "sd3"),
                          (("xl",), "sdxl"), (("pixartsigma",), "pixart_sigma"), (("sd2", "v21", "stablediffusion2"), "sd2x"),
                          (("sd15", "v15", "stablediffusionv15", "sd1", "v14"), "sd1x")):
        if any(word in lowered for word in words):
            return family
    return None


#: Shuffled versions cached per caption when a tool's per-draw tag shuffling is imported.
SHUFFLE_VARIANTS = 4


def caption_shuffle(keep_tokens: object, separator: object, result: ImportedConfig, where: str) -> dict[str, Any]:
    """Our ``caption_shuffle`` for a tool's tag shuffling (which reshuffles on every draw; ours caches
    :data:`SHUFFLE_VARIANTS` versions and trains one per epoch)."""
    result.notes.append(f"{where}: tag shuffling became `caption_shuffle` with {SHUFFLE_VARIANTS} cached versions per "
                        "caption (raise `variants` for more)")
    value: dict[str, Any] = {"variants": SHUFFLE_VARIANTS, "keep_tokens": int(keep_tokens or 0)}
    if isinstance(separator, str) and separator.strip() and separator.strip() != ",":
        value["separator"] = separator
    return value


def square_edge(width: float, height: float) -> int:
    """The edge of the square with the area of ``width`` x ``height`` (our ``pixel_area`` unit)."""
    return int(round((float(width) * float(height)) ** 0.5))
