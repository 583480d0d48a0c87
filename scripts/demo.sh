#!/usr/bin/env bash
# Set up (idempotent), then build the tiny model and shapes dataset, train, and score before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/simpletuner demo --out demo-output "$@"
