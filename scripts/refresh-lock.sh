#!/usr/bin/env bash
# Move requirements.lock forward on purpose. In a scratch venv, install the newest versions that
# pyproject.toml's ranges allow (torch stays at the lock's version unless SIMPLETUNER_TORCH_VERSION
# says otherwise), run the whole test suite against them, and only when it passes replace
# requirements.lock. To go past an upper bound in pyproject.toml, raise the bound first.
#
#   bash scripts/refresh-lock.sh              # resolve, test, write the lock
#   bash scripts/refresh-lock.sh -x -q        # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOCK=requirements.lock
SCRATCH=.venv-refresh
torch_version="${SIMPLETUNER_TORCH_VERSION:-$(sed -n 's/^torch==//p' "$LOCK")}"

rm -rf "$SCRATCH"
"$PYTHON" -m venv "$SCRATCH"
"$SCRATCH/bin/python" -m pip install -q --upgrade pip setuptools
"$SCRATCH/bin/python" -m pip install -q "torch==$torch_version"
"$SCRATCH/bin/python" -m pip install -q --no-build-isolation -e ".[test]"

candidate="$LOCK.candidate"
bash scripts/write-lock.sh "$SCRATCH/bin/python" > "$candidate"
echo "resolved $(grep -c '==' "$candidate") packages; running the suite against them"
if ! SIMPLETUNER_LOCK_FILE="$candidate" HF_HUB_OFFLINE=1 "$SCRATCH/bin/python" -m pytest -q "$@"; then
  echo "the suite failed with the newer versions: $LOCK is unchanged (candidate left in $candidate)" >&2
  exit 1
fi
diff <(grep '==' "$LOCK") <(grep '==' "$candidate") || true
mv "$candidate" "$LOCK"
rm -rf "$SCRATCH"
echo "$LOCK updated; run bash scripts/setup.sh to move .venv to it, then commit the lock"
