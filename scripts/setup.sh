#!/usr/bin/env bash
# Create .venv and install simpletuner with its test tools.
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${SIMPLETUNER_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
