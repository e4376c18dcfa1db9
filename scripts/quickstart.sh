#!/usr/bin/env bash
# Set up and start the node with embedded defaults: SQLite and files under ./data, DICOM on
# port 11112, results written to ./data/outbox-files, and the clearly labelled demo model when
# no MedGemma weights are configured. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/medgemma-node serve --config config/quickstart.toml "$@"
