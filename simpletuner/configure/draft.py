"""The three files the wizard edits, held in memory until everything has been validated.

A :class:`Draft` keeps config.json's keys exactly as the file spells them (``--lora_rank`` stays
``--lora_rank``, a deprecated alias stays the alias) and in file order, and keeps the dataset entries
and config.env lines as read. The wizard and ``--set`` change only the keys they are asked about, so
everything else is written back exactly as it was. Nothing here writes to disk: see
:mod:`simpletuner.configure.write`.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpletuner.options import ConfigError, alias_targets, options_by_name
from simpletuner.options.files import load_json_file, substitute_env
from simpletuner.options.messages import show_value
from simpletuner.options.validation import LORA_ONLY_OPTIONS
from simpletuner.options.values import coerce_value

#: Where a new setup goes when no path is given: the file ``simpletuner train`` looks for first.
DEFAULT_CONFIG_PATH = Path("config") / "config.json"
DATASET_FILE_NAME = "multidatabackend.json"
ENV_FILE_NAME = "config.env"
#: The id given to the first image dataset of a new setup.
DEFAULT_DATASET_ID = "images"

_ENV_LINE = re.compile(r"^\s*(export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")


@dataclass
class Draft:
    """config.json, the dataset list and config.env as they will be written.

    Attributes:
        config_path / dataset_path / env_path: where each file goes (relative paths are relative
            to the working directory, as everywhere in simpletuner).
        config: config.json's object, keys as spelled in the file, in file order.
        datasets: the dataset list's entries.
        env_lines: config.env's lines (comments and unknown variables included).
        originals: the bytes of each file that existed when the draft was loaded; a file whose
            content does not change is left alone, and the summary compares against these.
    """

    config_path: Path
    dataset_path: Path
    env_path: Path
    config: dict[str, Any] = field(default_factory=dict)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    env_lines: list[str] = field(default_factory=list)
    originals: dict[Path, bytes] = field(default_factory=dict)
    original_config: dict[str, Any] = field(default_factory=dict)
    original_datasets: list[dict[str, Any]] = field(default_factory=list)
    original_env_lines: list[str] = field(default_factory=list)

    @property
    def is_new(self) -> bool:
        """True while config.json does not exist yet: the wizard is creating a setup, not editing one."""
        return self.config_path not in self.originals

    def snapshot(self) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        """The three files' content now, for :meth:`restore` (the wizard replays answers from one)."""
        return copy.deepcopy(self.config), copy.deepcopy(self.datasets), list(self.env_lines)

    def restore(self, snapshot: tuple[dict[str, Any], list[dict[str, Any]], list[str]]) -> None:
        config, datasets, env_lines = snapshot
        self.config, self.datasets, self.env_lines = copy.deepcopy(config), copy.deepcopy(datasets), list(env_lines)

    # --- config.json, addressed by canonical option name ---------------------------------------------

    def key_for(self, name: str) -> str | None:
        """The key under which the file holds option ``name`` (``name``, ``--name`` or an alias)."""
        aliases = alias_targets()
        for key in self.config:
            bare = key.lstrip("-")
            if bare == name or aliases.get(bare) == name:
                return key
        return None

    def has(self, name: str) -> bool:
        return self.key_for(name) is not None

    def get(self, name: str) -> Any:
        """The raw value the file holds for ``name``, or the table default when it holds none."""
        key = self.key_for(name)
        return self.config[key] if key is not None else options_by_name()[name].default

    def typed(self, name: str) -> Any:
        """The value of ``name`` coerced by the options table (raw when it cannot be, e.g. ``{env:X}``)."""
        try:
            return coerce_value(options_by_name()[name], self.get(name), str(self.config_path))
        except ConfigError:
            return self.get(name)

    def set(self, name: str, value: Any) -> None:
        """Store ``value`` for option ``name``, under the file's existing spelling of the key
        (a whole float as an integer: ``"resolution": 64`` reads better and means the same)."""
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        self.config[self.key_for(name) or name] = value

    def remove(self, name: str) -> bool:
        key = self.key_for(name)
        if key is None:
            return False
        del self.config[key]
        return True

    def record(self, name: str, value: Any) -> None:
        """Take an answer for option ``name``: keep the raw value when the answer did not change it,
        leave the key out while it equals the table default, and remove it when unset."""
        option = options_by_name()[name]
        if self.has(name) and value == self.typed(name):
            return
        if value is None or (not self.has(name) and value == option.default):
            self.remove(name)
            return
        self.set(name, value)

    # --- the dataset list --------------------------------------------------------------------------

    def image_entries(self) -> list[dict[str, Any]]:
        return [entry for entry in self.datasets if entry.get("dataset_type", "image") == "image"]

    def find_image(self, dataset_id: str) -> dict[str, Any] | None:
        return next((entry for entry in self.image_entries() if entry.get("id") == dataset_id), None)

    def new_dataset_id(self) -> str:
        """An id no entry uses yet: ``images``, ``images-2``, ..."""
        taken = {entry.get("id") for entry in self.datasets}
        candidate, number = DEFAULT_DATASET_ID, 1
        while candidate in taken:
            number += 1
            candidate = f"{DEFAULT_DATASET_ID}-{number}"
        return candidate

    def add_image(self, dataset_id: str | None = None) -> dict[str, Any]:
        """Append a local image dataset (before the text-embed entry, so the file reads naturally)."""
        entry: dict[str, Any] = {"id": dataset_id or self.new_dataset_id(), "type": "local"}
        images = self.image_entries()
        position = self.datasets.index(images[-1]) + 1 if images else 0
        self.datasets.insert(position, entry)
        return entry

    def remove_image(self, entry: dict[str, Any]) -> None:
        self.datasets.remove(entry)

    def text_embeds_entry(self) -> dict[str, Any]:
        """The default text-embed cache entry, created under ``<cache_dir>/text`` when there is none."""
        caches = [entry for entry in self.datasets if entry.get("dataset_type") == "text_embeds"]
        for entry in caches:
            if len(caches) == 1 or entry.get("default") is True:
                return entry
        if caches:
            return caches[0]
        entry = {"id": "text-embeds", "dataset_type": "text_embeds", "type": "local",
                 "cache_dir": f"{str(self.typed('cache_dir')).rstrip('/')}/text"}
        self.datasets.append(entry)
        return entry

    # --- config.env --------------------------------------------------------------------------------

    def env_get(self, name: str) -> str | None:
        """The value config.env gives ``name`` (the last assignment wins, as when it is read)."""
        value = None
        for line in self.env_lines:
            match = _ENV_LINE.match(line)
            if match and match.group(2) == name:
                value = " ".join(shlex.split(match.group(3), comments=True))
        return value

    def env_set(self, name: str, value: str) -> None:
        """Rewrite the line that assigns ``name`` (keeping ``export``), or append one."""
        for index in range(len(self.env_lines) - 1, -1, -1):
            match = _ENV_LINE.match(self.env_lines[index])
            if match and match.group(2) == name:
                if self.env_get(name) != value:
                    self.env_lines[index] = f"{match.group(1) or ''}{name}={shlex.quote(value)}"
                return
        self.env_lines.append(f"{name}={shlex.quote(value)}")

    # --- rules that follow from the answers --------------------------------------------------------

    def settle(self) -> list[str]:
        """Remove keys the answers made invalid, add what every setup needs; return what was done.

        The same rules run after the wizard and after ``--set``, so both produce the same files.
        """
        notes = []
        if self.typed("model_type") == "full":
            for name in LORA_ONLY_OPTIONS:
                if self.remove(name):
                    notes.append(f"removed `{name}` from {self.config_path}: it only applies to LoRA training")
        for entry in self.image_entries():
            if entry.get("type") != "aws":
                for key in [key for key in entry if key.startswith("aws_")]:
                    del entry[key]
                    notes.append(f"removed {key!r} from dataset {entry.get('id')!r}: it only applies to type 'aws'")
        self.text_embeds_entry()
        return notes

    def point_at_dataset_file(self, cwd: Path) -> None:
        """Make ``data_backend_config`` name :attr:`dataset_path` unless it already does."""
        current = self.get("data_backend_config")
        if current and _same_file(substitute_env(current, "data_backend_config", self.config_path), self.dataset_path):
            return
        self.set("data_backend_config", display_path(self.dataset_path, cwd))


def record_entry_value(entry: dict[str, Any], key: str, value: Any, dataset_type: str = "image") -> None:
    """Take an answer for a dataset key, by the same rules as :meth:`Draft.record`: an unchanged value
    stays as written, a schema default is not added, and None removes the key."""
    from simpletuner.data.schema import defaults

    default = defaults(dataset_type).get(key)
    if key in entry and value == entry[key]:
        return
    if value is None or (key not in entry and value == default):
        entry.pop(key, None)
    else:
        entry[key] = value


def _same_file(a: str | Path, b: str | Path) -> bool:
    return os.path.abspath(os.fspath(a)) == os.path.abspath(os.fspath(b))


def display_path(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when it is inside it (how config files name paths), else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path(os.path.abspath(cwd))).as_posix()
    except ValueError:
        return str(absolute)


def _named_dataset_list(text: str, config_path: Path) -> Path:
    """The dataset list that config.json's ``data_backend_config`` names; a name no file can have (too
    long for the OS, a NUL byte, ``~user`` of an unknown user) is a ConfigError naming the file."""
    try:
        path = Path(text).expanduser()
        path.is_file()  # raises for a name the OS cannot look up at all
    except (OSError, ValueError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"{config_path}: `data_backend_config` {show_value(text)} cannot name a file ({reason}); "
                          "fix it or remove it to use multidatabackend.json beside the config") from None
    return path


def load_draft(config_arg: str | None) -> Draft:
    """Read the files a configure run starts from; missing files start empty.

    The dataset list is the file ``data_backend_config`` already names, else ``multidatabackend.json``
    beside config.json; config.env is always beside config.json.
    """
    config_path = Path(config_arg).expanduser() if config_arg else DEFAULT_CONFIG_PATH
    if config_path.suffix != ".json":
        raise ConfigError(f"{config_path}: `simpletuner configure` writes JSON; give a path ending in .json")
    if config_path.is_dir():
        raise ConfigError(f"{config_path} is a folder; give the path of the config.json to write")
    originals: dict[Path, bytes] = {}
    config: dict[str, Any] = {}
    if config_path.exists():
        loaded = load_json_file(config_path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be an object of option names to values, "
                              f"not {type(loaded).__name__}")
        config = loaded
        originals[config_path] = config_path.read_bytes()
    draft = Draft(config_path=config_path, dataset_path=config_path.parent / DATASET_FILE_NAME,
                  env_path=config_path.parent / ENV_FILE_NAME, config=config, originals=originals)
    named = draft.get("data_backend_config")
    if isinstance(named, str) and named:
        draft.dataset_path = _named_dataset_list(substitute_env(named, "data_backend_config", config_path), config_path)
    if draft.dataset_path.is_file():
        entries = load_json_file(draft.dataset_path)
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ConfigError(f"{draft.dataset_path}: the dataset list must be a JSON list of objects; fix it by "
                              "hand (see documentation/DATASETS.md) or point data_backend_config elsewhere")
        draft.datasets = entries
        originals[draft.dataset_path] = draft.dataset_path.read_bytes()
    if draft.env_path.is_file():
        originals[draft.env_path] = draft.env_path.read_bytes()
        draft.env_lines = originals[draft.env_path].decode("utf-8").splitlines()
    draft.original_config = copy.deepcopy(draft.config)
    draft.original_datasets = copy.deepcopy(draft.datasets)
    draft.original_env_lines = list(draft.env_lines)
    return draft
