#!/usr/bin/env bash
# Installs the project and its dependencies into the current Python.
# A torch that is already installed (for example a CUDA build on a GPU machine) is kept;
# only where none is present is torch==2.13.0 installed first, so that the unpinned
# requirement in pyproject.toml does not pull the newest multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  # Where a local wheel directory exists (as on the project's CPU machines), look there first.
  find_links=()
  [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
  "$PYTHON" -m pip install -q "${find_links[@]}" "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[${1:-dev}]"
