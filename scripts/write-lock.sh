#!/usr/bin/env bash
# Print a lock (exact versions of everything installed in the venv of the given python) on stdout.
# torch's local build label (+cpu, +cu128) is dropped so one lock serves CPU and CUDA builds alike;
# CUDA runtime wheels are left out because only CUDA builds of torch install them.
set -euo pipefail
python="$1"
echo "# Exact versions scripts/setup.sh installs (as pip constraints). Written by scripts/write-lock.sh from"
echo "# a venv the whole test suite passed in; refresh on purpose with scripts/refresh-lock.sh, never by hand."
echo "# Python $("$python" -c 'import platform; print(platform.python_version(), platform.machine(), platform.system())')"
"$python" -m pip freeze --all --exclude-editable \
  | grep -viE '^(nvidia-|triton==|cuda-)' \
  | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
  | LC_ALL=C sort -f
