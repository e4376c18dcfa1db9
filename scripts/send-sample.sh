#!/usr/bin/env bash
# Send the real chest radiograph bundled with pydicom-data (RG1_UNCI.dcm: CR, PA chest) to the
# node started by scripts/quickstart.sh. Usage: scripts/send-sample.sh [PORT] [FILE NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
port=${1:-11112}
name=${2:-RG1_UNCI.dcm}
.venv/bin/python -c 'import pydicom_data' 2>/dev/null || .venv/bin/python -m pip install -q pydicom-data
sample=$(.venv/bin/python -c "from pydicom.data import get_testdata_file as g; print(g('$name', download=False))")
exec .venv/bin/medgemma-node send "$sample" --host 127.0.0.1 --port "$port"
