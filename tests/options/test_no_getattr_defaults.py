"""No code reads a declared option through ``getattr(config, "<option>", default)``.

Such a call supplies its own default, which can disagree with the options table, and it swallows
TrainConfig's unknown-option error, so a misspelt or removed option silently reads as the default.
Code reads ``config.<option>``; tests build configs with :func:`simpletuner.testing.config.make_config`.

The rule, checked on the syntax tree of every ``.py`` file under ``simpletuner/``:

- a call ``getattr(X, NAME, DEFAULT)`` (three arguments: the default is what makes it a silent read),
- where ``NAME`` is a string literal that is a declared option name or a deprecated alias of one,
- and ``X`` is a config: a variable named ``config``, ``cfg`` or ``train_config``, or any attribute
  access ending in ``.config`` or ``.train_config`` (``self.config``, ``self.family.config``).

A second rule catches the same read with a computed name: ``getattr(X, <not a literal>, DEFAULT)`` on
such an ``X`` (write ``getattr(config, name)`` without a default; every computed name must be declared).

Not flagged: ``getattr`` without a default, and ``getattr`` on objects that are not configs (the
launcher settings, modules, pipelines, optional attributes of models). A local variable named
``config`` that holds something else (a diffusers ``vae.config``) is flagged only when the name it
reads is also an option name; rename the variable then.
"""

from __future__ import annotations

import ast
from pathlib import Path

from simpletuner.options import alias_targets, options_by_name

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "simpletuner"

#: Variables that hold a TrainConfig, and attributes that do (``self.config``, ``trainer.config``).
CONFIG_NAMES = frozenset({"config", "cfg", "train_config"})
CONFIG_ATTRIBUTES = frozenset({"config", "train_config"})

#: Occurrences in files that are being converted separately, as "path:option". This list must only
#: shrink, down to empty: a new entry is a regression, and an entry whose call is gone fails below so
#: it is removed in the same change that converts the call.
ALLOWED: frozenset[str] = frozenset()
#: The same for computed names, as "path:line" (empty, and it should stay so).
ALLOWED_COMPUTED: frozenset[str] = frozenset()


def _is_config(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in CONFIG_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in CONFIG_ATTRIBUTES
    return False


def _getattr_with_default_on_config(tree: ast.AST):
    """Every ``getattr(<config>, name, default)`` call in ``tree``."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) == 3 and not node.keywords and _is_config(node.args[0])):
            yield node


def declared_names() -> frozenset[str]:
    return frozenset(options_by_name()) | frozenset(alias_targets())


def literal_option_reads(source: str, declared: frozenset[str]) -> list[tuple[int, str]]:
    """(line, option) of each ``getattr(<config>, "<option>", default)`` in ``source``."""
    found = []
    for call in _getattr_with_default_on_config(ast.parse(source)):
        name = call.args[1]
        if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value in declared:
            found.append((call.lineno, name.value))
    return found


def computed_name_reads(source: str) -> list[int]:
    """Lines of each ``getattr(<config>, <computed name>, default)`` in ``source``."""
    return [call.lineno for call in _getattr_with_default_on_config(ast.parse(source))
            if not isinstance(call.args[1], ast.Constant)]


def _package_sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(REPO_ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_the_detector_finds_default_reads_on_configs_only() -> None:
    source = (
        "getattr(config, 'lora_rank', 16)\n"            # flagged
        "getattr(self.config, 'resolution', None)\n"    # flagged
        "getattr(self.family.config, 'seed', 0)\n"      # flagged
        "getattr(cfg, 'checkpointing_steps', 5)\n"      # flagged: a deprecated alias
        "getattr(config, 'lora_rank')\n"                # no default: raises on an unknown name
        "getattr(launcher, 'lora_rank', 16)\n"          # not a config
        "getattr(config, 'shift_factor', None)\n"       # not an option (a diffusers config attribute)
        "getattr(config, name, None)\n"                 # computed name: the second rule
    )
    assert literal_option_reads(source, declared_names()) == [
        (1, "lora_rank"), (2, "resolution"), (3, "seed"), (4, "checkpointing_steps")]
    assert computed_name_reads(source) == [8]


def test_no_getattr_default_for_a_declared_option() -> None:
    declared = declared_names()
    found = {f"{path}:{option}": line for path, source in _package_sources()
             for line, option in literal_option_reads(source, declared)}
    new = sorted(f"{key.rsplit(':', 1)[0]}:{line} ({key.rsplit(':', 1)[1]})"
                 for key, line in found.items() if key not in ALLOWED)
    assert not new, ("read these options as `config.<option>` (the options table holds the default; tests build "
                     "configs with simpletuner.testing.config.make_config):\n  " + "\n  ".join(new))
    stale = sorted(ALLOWED - set(found))
    assert not stale, f"converted: remove these entries from ALLOWED in {Path(__file__).name}: {stale}"


def test_no_getattr_default_with_a_computed_option_name() -> None:
    found = {f"{path}:{line}" for path, source in _package_sources() for line in computed_name_reads(source)}
    new = sorted(found - ALLOWED_COMPUTED)
    assert not new, ("`getattr(config, name, default)` hides an undeclared name behind its default; write "
                     "`getattr(config, name)`:\n  " + "\n  ".join(new))
