"""What the wizard asks, derived from the options table and the dataset schema (no terminal code).

A :class:`Question` is one answer to collect: the key it sets (an option name, ``dataset.<key>`` or
``env.<NAME>``, the same names ``--set`` takes), its help, how to ask (pick one, yes/no, or text),
the default, and how to turn the answer into the value stored. Choices, defaults and help come from
:func:`simpletuner.options.options_by_name`, the validation module's list of values the trainer
supports so far, and the dataset key table (:mod:`simpletuner.data.schema`); nothing is restated
here, so the wizard never disagrees with ``simpletuner train``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from simpletuner.data import schema as dataset_schema
from simpletuner.options import ConfigError, options_by_name
from simpletuner.options.spec import Option
from simpletuner.options.values import coerce_value, parse_bool

#: The label of the choice that leaves an optional setting unset.
UNSET = "(unset)"
#: Storage types the wizard knows how to ask about; table-backed datasets are written by hand.
WIZARD_STORAGE_TYPES = ("local", "aws")
#: Options whose answer is a path: the terminal offers Tab completion for them.
PATH_KEYS = frozenset({"pretrained_model_name_or_path", "output_dir", "cache_dir", "dataset.instance_data_dir"})



@dataclass(frozen=True)
class Question:
    """One answer to collect.

    Attributes:
        key: what the answer sets: an option name, ``dataset.<key>``, ``text_embeds.<key>`` or
            ``env.<NAME>``; also the name shown in the terminal.
        help: the table's (or schema's) help text.
        kind: ``select`` (one of ``choices``), ``confirm`` (yes/no) or ``text``.
        default: the preselected choice, the yes/no default, or the text already typed in.
        choices: the labels offered by a ``select``.
        convert: the answer (a label, a bool or the typed text) to the value stored; raises
            :class:`ConfigError` with a message for the user when the text is not acceptable.
    """

    key: str
    help: str
    kind: str
    default: Any
    choices: tuple[str, ...] = ()
    convert: Callable[[Any], Any] = lambda answer: answer

    @property
    def is_path(self) -> bool:
        return self.key in PATH_KEYS

    def check(self, answer: Any) -> bool | str:
        """True when ``answer`` converts, else the message to show (questionary's validator form)."""
        try:
            self.convert(answer)
        except ConfigError as error:
            return str(error)
        return True


# --- options of the table --------------------------------------------------------------------------


def offered_choices(option: Option) -> tuple[str, ...]:
    """The option's choices, less the values validation still refuses (``SUPPORTED_VALUES``)."""
    from simpletuner.options.validation import SUPPORTED_VALUES

    supported = SUPPORTED_VALUES.get(option.name)
    return tuple(str(c) for c in option.choices or () if supported is None or c in supported)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def option_question(name: str, current: Any, choices: tuple[str, ...] | None = None, extra_help: str = "",
                    applies: Callable[[str], bool] | None = None) -> Question:
    """The question for option ``name`` whose value is now ``current``.

    ``choices`` narrows the offered values further (the families the registry implements, a
    family's flavours); it may also give choices to an option the table leaves free-form.
    ``applies`` drops the table's values that cannot work in this setup (a CUDA-only preset on a
    CPU); the current value stays offered, so an edit never loses it.
    """
    option = options_by_name()[name]
    if not option.implemented:
        raise ValueError(f"the wizard only asks implemented options; `{name}` is not")
    help_text = (option.help + (" " + extra_help if extra_help else "")).strip()

    def convert(answer: Any) -> Any:
        if answer == UNSET:
            return None
        if isinstance(answer, str) and not answer.strip():
            if option.required:
                raise ConfigError(f"`{name}` is required; type a value")
            return option.default
        return coerce_value(option, answer, "answer")

    if option.kind == "bool":
        default = current if isinstance(current, bool) else bool(option.default)
        return Question(name, help_text, "confirm", default, convert=convert)
    offered = choices if choices is not None else offered_choices(option) if option.choices else ()
    if applies is not None and choices is None:
        offered = tuple(c for c in offered if applies(c) or c == _as_text(current))
    if offered:
        if option.default is None and not option.required and choices is None:
            offered = (*offered, UNSET)
        candidates = [_as_text(current), _as_text(option.default), UNSET if current is None else ""]
        default = next((c for c in candidates if c in offered), offered[0])
        return Question(name, help_text, "select", default, tuple(offered), convert)
    return Question(name, help_text, "text", _as_text(current), convert=convert)


# --- keys of a dataset entry --------------------------------------------------------------------------


def dataset_choices(key: str) -> tuple[str, ...]:
    """The values offered for a dataset key: the table's choices, less those the wizard cannot set up."""
    if key == "type":
        return tuple(t for t in WIZARD_STORAGE_TYPES if t in dataset_schema.SUPPORTED_BACKEND_TYPES)
    choices = dataset_schema.key_named(key).choices
    if key == "caption_strategy":  # the table strategies need a table, which the wizard does not set up
        return tuple(s for s in choices if s not in dataset_schema.METADATA_BACKENDS)
    return choices


def dataset_key_help() -> dict[str, str]:
    """Help for every key of an image entry, and of the text-embedding entry as ``text_embeds.<key>``."""
    docs = {name: key.help for name, key in dataset_schema.keys_for("image").items()}
    docs.update({f"text_embeds.{name}": key.help for name, key in dataset_schema.keys_for("text_embeds").items()})
    return docs


def coerce_dataset_value(key: str, raw: Any, source: str, dataset_type: str = "image") -> Any:
    """``raw`` (typed text, or a ``--set`` value) as the JSON value the schema expects for ``key``.

    Empty text and ``null`` unset an optional key (its default). The value is then checked against
    the key's declaration (type, choices, range), so the wizard asks again at once; the rules that
    span several keys are checked when the whole list is validated. Unknown keys are returned
    unchanged so that the schema's own "did you mean" message reports them.
    """
    declared = dataset_schema.keys_for(dataset_type).get(key)
    if declared is None or not isinstance(raw, str):
        return raw
    text = raw.strip()
    if not text and declared.required:
        raise ConfigError(f"{source}: dataset key `{key}` is required; type a value")
    if not text or (text.lower() in ("null", "none") and declared.kind != "str"):
        return None if declared.required else declared.default
    value = _typed_text(declared, raw, source)
    declared.parse(value, source)  # DatasetConfigError (a ConfigError) naming the key, value and range
    return value


def _typed_text(declared: dataset_schema.DatasetKey, raw: str, source: str) -> Any:
    """The JSON value typed text stands for, by the key's kind (lists of words and ids stay text)."""
    kind, text = declared.kind, raw.strip()
    try:
        if kind in ("bool", "optional_bool"):
            return parse_bool(text)
        if kind in ("int", "optional_int"):
            return int(text)
        if kind in ("float", "number"):
            number = json.loads(text)
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError(text)
            return number
        if kind == "number_list":
            values = json.loads(text) if text.startswith("[") else [float(p) for p in text.split(",") if p.strip()]
            if not isinstance(values, list):
                raise ValueError(text)
            return values
        if kind == "object":
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        return raw
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        words = {"bool": "true or false", "optional_bool": "true or false", "int": "an integer",
                 "optional_int": "an integer", "float": "a number", "number": "a number",
                 "number_list": "a list of numbers (1.0,1.5 or [1.0, 1.5])", "object": "a JSON object"}
        raise ConfigError(f"{source}: dataset key `{declared.name}` = {dataset_schema.shown(raw)} is not "
                          f"{words[kind]}") from None


def dataset_question(key: str, entry: dict[str, Any], check: Callable[[Any], None] | None = None) -> Question:
    """The question for ``key`` of the image dataset ``entry``; ``check`` adds a rule for the
    converted value (e.g. "the folder exists") that raises :class:`ConfigError`."""
    declared = dataset_schema.key_named(key)
    default, required = (None if declared.required else declared.default), declared.required
    current = entry.get(key, default)
    help_text = declared.help
    choices = dataset_choices(key)

    def convert(answer: Any) -> Any:
        value = None if answer == UNSET else coerce_dataset_value(key, answer, "answer")
        if check is not None:
            check(value)
        return value

    if declared.kind in ("bool", "optional_bool"):
        return Question(f"dataset.{key}", help_text, "confirm", bool(current), convert=convert)
    if choices:
        offered = choices if required or default is not None else (*choices, UNSET)
        label = UNSET if current is None else str(current)
        return Question(f"dataset.{key}", help_text, "select", label if label in offered else offered[0], offered,
                        convert)
    return Question(f"dataset.{key}", help_text, "text", _as_text(current), convert=convert)


# --- config.env ------------------------------------------------------------------------------------


def env_value(name: str, raw: Any, source: str) -> str:
    """A config.env value as text. Whole numbers are checked here, where the wizard can ask again;
    every variable is checked as a whole by the launcher's own loader before anything is written."""
    from simpletuner.options.files import LAUNCHER_VARIABLES

    if name not in LAUNCHER_VARIABLES:
        raise ConfigError(f"{source}: unknown config.env variable `{name}`")
    text = str(raw).strip()
    if name == "TRAINING_NUM_PROCESSES":
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{source}: `{name}` = {raw!r} must be a whole number of at least 1")
        return str(int(text))
    return text


def env_question(name: str, current: str | None) -> Question:
    """A config.env variable, with the launcher's own description of it."""
    from simpletuner.options.files import LAUNCHER_VARIABLES

    return Question(f"env.{name}", LAUNCHER_VARIABLES[name] + " (written to config.env)", "text", current or "",
                    convert=lambda answer: env_value(name, answer, "answer"))


def flow_question(key: str, help_text: str, choices: tuple[str, ...] = (), default: Any = None) -> Question:
    """A question about the wizard's own flow (which dataset to edit, write or not): no option behind it."""
    if choices:
        return Question(key, help_text, "select", default if default in choices else choices[0], choices)
    return Question(key, help_text, "confirm", bool(default))
