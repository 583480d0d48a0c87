"""Named validation prompts: the bundled library (``--validation_prompt_library``) and a user's JSON
file (``--user_prompt_library``). Torch-free, so the config rules can check a file before any model
loads. A shortname becomes part of image file names, so it is limited to filename-safe characters."""

from __future__ import annotations

import json
import re
from pathlib import Path

#: Generic subjects that show whether a fine-tune still draws things outside its dataset.
BUILTIN_PROMPTS: dict[str, str] = {
    "portrait": "a close-up portrait photo of a person, natural window light",
    "landscape": "a wide landscape with mountains and a lake at sunrise",
    "animal": "a photo of a cat sitting on a wooden table",
    "city": "a busy city street at night with neon signs, rain on the ground",
    "food": "a bowl of fresh fruit on a kitchen counter",
    "text": "a hand-painted wooden sign that says \"hello\"",
    "painting": "an oil painting of a sailing ship on a stormy sea",
    "object": "a red sports car parked in front of a white wall",
}

SHORTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


#: Settings a library entry written as an object may carry besides its prompt, with their kinds.
PROMPT_SETTINGS: dict[str, type] = {"negative_prompt": str, "seed": int, "steps": int, "guidance": float,
                                    "width": int, "height": int}


def load_user_prompt_library(path: str | Path) -> dict[str, str]:
    """``{"shortname": "prompt", ...}`` from ``path``; ValueError with the reason when it is not one.

    An entry may also be an object, ``{"prompt": "...", "seed": 7, "steps": 28, ...}`` (see
    :data:`PROMPT_SETTINGS`), as other trainers' sample prompts carry their own settings; this
    returns its prompt and :func:`load_prompt_settings` the rest."""
    return {name: entry["prompt"] for name, entry in _load_entries(path).items()}


def load_prompt_settings(path: str | Path) -> dict[str, dict]:
    """Shortname -> the entry's own settings (only those it sets), for entries written as objects."""
    return {name: {key: value for key, value in entry.items() if key != "prompt"}
            for name, entry in _load_entries(path).items()}


def _load_entries(path: str | Path) -> dict[str, dict]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: runaway nesting
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{str(path)!r} must hold a non-empty JSON object of {{\"shortname\": \"prompt\"}} pairs")
    entries = {}
    for name, value in data.items():
        if not SHORTNAME.match(name):
            raise ValueError(f"shortname {name!r} in {str(path)!r} may only use letters, digits, '_', '-' and '.' "
                             "(it becomes part of the image file names)")
        entries[name] = _entry(name, value, str(path))
    return entries


def _entry(name: str, value: object, path: str) -> dict:
    """One library entry as ``{"prompt": ..., <settings>}``; ValueError naming the entry and key."""
    entry = value if isinstance(value, dict) else {"prompt": value}
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the prompt of {name!r} in {path!r} must be a non-empty string")
    for key, setting in entry.items():
        if key == "prompt":
            continue
        kind = PROMPT_SETTINGS.get(key)
        if kind is None:
            raise ValueError(f"entry {name!r} in {path!r} has unknown key {key!r}; an entry may set 'prompt' and "
                             f"{sorted(PROMPT_SETTINGS)}")
        if not _is_kind(setting, kind) or (kind is not str and setting <= 0 and key != "seed") \
                or (key == "seed" and setting < 0):
            raise ValueError(f"entry {name!r} in {path!r}: {key!r} is {setting!r}; expected "
                             f"{'text' if kind is str else 'a positive number' if key != 'seed' else 'a whole number >= 0'}")
    return dict(entry)


def _is_kind(value: object, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def library_prompts(config) -> dict[str, str]:
    """The named prompts a run validates besides ``--validation_prompt``: the bundled ones first,
    then the user's (whose entries replace bundled ones of the same shortname)."""
    prompts: dict[str, str] = {}
    if config.validation_prompt_library:
        prompts.update(BUILTIN_PROMPTS)
    if config.user_prompt_library:
        prompts.update(load_user_prompt_library(config.user_prompt_library))
    return prompts


def library_prompt_settings(config) -> dict[str, dict]:
    """Shortname -> the settings the user's library entry carries ({} for plain-string entries)."""
    if not config.user_prompt_library:
        return {}
    return load_prompt_settings(config.user_prompt_library)
