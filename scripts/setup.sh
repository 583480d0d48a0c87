#!/usr/bin/env bash
# Create .venv and install simpletuner with its test tools at exactly the versions in requirements.lock,
# so every fresh machine gets the environment the test suite passed in. torch goes first, pinned (the
# lock's version, or SIMPLETUNER_TORCH_VERSION): an unpinned torch would pull a multi-GB CUDA build.
# Idempotent: re-running it moves an existing .venv back to the lock. The lock moves forward only
# through scripts/refresh-lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOCK=requirements.lock
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
constraints="$LOCK"
torch_version="$(sed -n 's/^torch==//p' "$LOCK")"
if [ -n "${SIMPLETUNER_TORCH_VERSION:-}" ]; then
  # another torch than the locked one: everything else stays locked
  torch_version="$SIMPLETUNER_TORCH_VERSION"
  constraints="$(mktemp)"
  grep -v '^torch==' "$LOCK" > "$constraints"
fi
install() { .venv/bin/python -m pip install -q -c "$constraints" "$@"; }
install pip setuptools
install "torch==$torch_version"
# --no-build-isolation: the build uses the locked setuptools instead of whatever the index has today
install --no-build-isolation -e ".[test]"
