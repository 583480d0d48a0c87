#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite offline, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the CLI's bounded OpenMP spin (simpletuner/training/cpu_runtime.py) for the test processes too, so the
# suite holds up on a busy machine; a value already exported wins
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-100000}"
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
