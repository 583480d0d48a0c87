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


def load_user_prompt_library(path: str | Path) -> dict[str, str]:
    """``{"shortname": "prompt", ...}`` from ``path``; ValueError with the reason when it is not one."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: runaway nesting
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{str(path)!r} must hold a non-empty JSON object of {{\"shortname\": \"prompt\"}} pairs")
    for name, prompt in data.items():
        if not SHORTNAME.match(name):
            raise ValueError(f"shortname {name!r} in {str(path)!r} may only use letters, digits, '_', '-' and '.' "
                             "(it becomes part of the image file names)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the prompt of {name!r} in {str(path)!r} must be a non-empty string")
    return dict(data)


def library_prompts(config) -> dict[str, str]:
    """The named prompts a run validates besides ``--validation_prompt``: the bundled ones first,
    then the user's (whose entries replace bundled ones of the same shortname)."""
    prompts: dict[str, str] = {}
    if config.validation_prompt_library:
        prompts.update(BUILTIN_PROMPTS)
    if config.user_prompt_library:
        prompts.update(load_user_prompt_library(config.user_prompt_library))
    return prompts
