"""``--set KEY=VALUE``: the non-interactive way to give the wizard's answers.

Keys (the same names the wizard shows above each question):

- ``learning_rate=2e-4``: an option of the table (``--`` prefixes and deprecated aliases work).
  The value is coerced by the table's own rules; ``null`` removes the key, whatever the option's kind
  (a string option too: ``resume_from_checkpoint=null`` is unset, not the text "null").
- ``dataset.KEY=VALUE``: a key of the first image dataset, which is created when there is none.
- ``dataset.ID.KEY=VALUE``: a key of the image dataset ``ID``, created when missing.
- ``text_embeds.KEY=VALUE``: a key of the default text-embedding cache entry.
- ``env.NAME=VALUE``: a variable of config.env (``env.TRAINING_NUM_PROCESSES=2``); the names
  are the launcher's (:data:`simpletuner.options.files.LAUNCHER_VARIABLES`).

Dataset values are read as the schema's kind for that key (numbers, true/false, lists); a key the
schema does not know is passed through so that validation names the closest known key.
"""

from __future__ import annotations

import difflib
from typing import Any

from simpletuner.configure.draft import Draft, record_entry_value
from simpletuner.configure.questions import coerce_dataset_value, env_value
from simpletuner.options import ConfigError, alias_targets, options_by_name, unknown_option_message
from simpletuner.options.values import coerce_value


def apply_setting(draft: Draft, setting: str) -> None:
    """Apply one ``KEY=VALUE`` to ``draft``; raise :class:`ConfigError` naming the setting when it is wrong."""
    key, sep, raw = setting.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {setting!r}: write KEY=VALUE, e.g. --set learning_rate=1e-4")
    source = f"--set {key}"
    if key.startswith("dataset."):
        dataset_id, _, name = key[len("dataset."):].rpartition(".")
        entry = (draft.find_image(dataset_id) or draft.add_image(dataset_id)) if dataset_id else \
            (draft.image_entries() or [draft.add_image()])[0]
        _set_entry_value(entry, name, None if is_null(raw) else coerce_dataset_value(name, raw, source))
    elif key.startswith("text_embeds."):
        name = key[len("text_embeds."):]
        value = None if is_null(raw) else coerce_dataset_value(name, raw, source, "text_embeds")
        _set_entry_value(draft.text_embeds_entry(), name, value, "text_embeds")
    elif key.startswith("env."):
        from simpletuner.options.files import LAUNCHER_VARIABLES

        name = key[len("env."):]
        if name not in LAUNCHER_VARIABLES:
            match = difflib.get_close_matches(name, list(LAUNCHER_VARIABLES), n=1, cutoff=0.6)
            hint = f"did you mean `env.{match[0]}`?" if match else f"known: {', '.join(LAUNCHER_VARIABLES)}"
            raise ConfigError(f"{source}: unknown config.env variable `{name}`; {hint}")
        draft.env_set(name, env_value(name, raw, source))
    else:
        bare = key.lstrip("-")
        name = alias_targets().get(bare, bare)
        if name not in options_by_name():
            raise ConfigError(unknown_option_message(bare, "--set"))
        draft.record(name, coerce_value(options_by_name()[name], None if is_null(raw) else raw, "--set"))


def is_null(raw: str) -> bool:
    """Whether a ``--set`` value is JSON's ``null``: it unsets the key for every kind of option, as ``null``
    does in config.json (read there as None, which :func:`coerce_value` keeps as unset). Only the exact
    word counts, so a string option can still hold ``none`` (``report_to=none`` disables tracking).
    A dataset key set to ``null`` is removed from its entry, so the schema's default applies."""
    return raw.strip() == "null"


def option_named(setting: str) -> str | None:
    """The option a ``KEY=VALUE`` setting answers (its canonical name), or None for dataset,
    text-embed and config.env keys."""
    key = setting.partition("=")[0].strip()
    if key.startswith(("dataset.", "text_embeds.", "env.")):
        return None
    bare = key.lstrip("-")
    return alias_targets().get(bare, bare)


def _set_entry_value(entry: dict[str, Any], key: str, value: Any, dataset_type: str = "image") -> None:
    if not key:
        raise ConfigError("--set dataset.: name a dataset key, e.g. --set dataset.instance_data_dir=images")
    record_entry_value(entry, key, value, dataset_type)
