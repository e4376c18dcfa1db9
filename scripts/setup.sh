#!/usr/bin/env bash
# Create .venv and install medgemma-node into it (torch first: the CPU build, no CUDA wheels).
# Usage: scripts/setup.sh [--test]   (--test also installs the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  # A GPU workstation installs its CUDA build of torch first; elsewhere the pinned CPU build.
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
.venv/bin/python -m pip install -q -e ".${extras}"
