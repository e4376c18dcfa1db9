#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, then pytest against the real peers
# (DCMTK, dicom3tools, PixelMed, Orthanc, PostgreSQL at 127.0.0.1:5432). Peers are installed by
# .ci/run (Debian: apt-get install dcmtk dicom3tools orthanc libpixelmed-java
# openjdk-17-jre-headless).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
for tool in /usr/bin/storescu /usr/bin/dciodvfy /usr/sbin/Orthanc /usr/bin/java; do
  [ -x "$tool" ] || { echo "missing $tool: apt-get install dcmtk dicom3tools orthanc openjdk-17-jre-headless" >&2; exit 2; }
done
[ -f /usr/share/java/pixelmed.jar ] || {
  echo "missing /usr/share/java/pixelmed.jar: apt-get install libpixelmed-java" >&2; exit 2; }
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
