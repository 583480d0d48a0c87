"""The environment is the locked one: scripts/setup.sh installs exactly requirements.lock, and
pyproject.toml's ranges never admit a version newer than the lock (the newest the suite passed with).

``SIMPLETUNER_LOCK_FILE`` points these checks at a candidate lock while scripts/refresh-lock.sh
tests newer versions before they replace requirements.lock.
"""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(os.environ.get("SIMPLETUNER_LOCK_FILE") or ROOT / "requirements.lock")

#: The packages whose version changes broke or could break training; they must be in the lock.
KEY_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "lycoris-lora", "optimum-quanto",
                "torchao", "bitsandbytes", "safetensors", "tokenizers", "huggingface-hub", "numpy")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` from a lock of ``name==version`` lines (``#`` comments allowed)."""
    pins = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator and version and not re.search(r"[<>!~;@ ]", line), \
            f"{path.name}:{number}: {line!r} is not an exact name==version pin"
        pins[normalized(name)] = version
    return pins


def base_version(text: str) -> Version:
    """torch's CPU and CUDA builds (``2.13.0+cpu``) count as the locked ``2.13.0``."""
    return Version(Version(text).public)


def test_the_lock_pins_every_key_package_exactly():
    pins = read_lock(LOCK)
    missing = [name for name in KEY_PACKAGES if name not in pins]
    assert not missing, f"{LOCK.name} lacks {missing}: regenerate it with scripts/refresh-lock.sh"
    assert "simpletuner" not in pins, "the project itself is installed editable, not from the lock"


def test_installed_versions_are_the_locked_ones():
    """What scripts/setup.sh installed is exactly the lock (torch may be overridden on purpose)."""
    pins = read_lock(LOCK)
    if os.environ.get("SIMPLETUNER_TORCH_VERSION"):
        pins["torch"] = os.environ["SIMPLETUNER_TORCH_VERSION"]
    differences = []
    for name, locked in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            differences.append(f"{name}: locked {locked}, not installed")
            continue
        if base_version(installed) != base_version(locked):
            differences.append(f"{name}: locked {locked}, installed {installed}")
    assert not differences, ("the environment differs from " + LOCK.name + " (run bash scripts/setup.sh):\n"
                             + "\n".join(differences))


#: Extras that cannot be in the lock, with why: their versions are not tested here, so no upper bound is claimed.
UNLOCKED_EXTRAS: dict[str, str] = {}


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = list(project["dependencies"])
    for name, extra in project.get("optional-dependencies", {}).items():
        if name not in UNLOCKED_EXTRAS:
            declared.extend(extra)
    return [Requirement(text) for text in declared]


@pytest.mark.parametrize("requirement", declared_requirements(), ids=str)
def test_pyproject_ranges_end_at_the_locked_version(requirement: Requirement):
    """Every declared range admits the locked version and nothing newer: the upper bound is the newest
    version the suite has passed with, so users installing into their own environment get no surprise."""
    pins = read_lock(LOCK)
    name = normalized(requirement.name)
    assert name in pins, f"{requirement.name} is declared in pyproject.toml but missing from {LOCK.name}"
    locked = Version(pins[name])
    assert requirement.specifier.contains(locked, prereleases=True), \
        f"pyproject.toml's {requirement} excludes the locked {requirement.name} {locked}"
    upper_bounds = [spec for spec in requirement.specifier if spec.operator in ("<", "<=")]
    assert upper_bounds, f"pyproject.toml's {requirement} has no upper bound (use <={locked})"
    assert all(spec.operator == "<=" and Version(spec.version) <= locked for spec in upper_bounds), \
        f"pyproject.toml's {requirement} admits versions newer than the tested {locked}"
