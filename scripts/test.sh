#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, then pytest against the real peers
# (DCMTK, dicom3tools, Orthanc, PostgreSQL at 127.0.0.1:5432). Peers are installed by .ci/run
# (Debian: apt-get install dcmtk dicom3tools orthanc).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
for tool in /usr/bin/storescu /usr/bin/dciodvfy /usr/sbin/Orthanc; do
  [ -x "$tool" ] || { echo "missing $tool: apt-get install dcmtk dicom3tools orthanc" >&2; exit 2; }
done
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
