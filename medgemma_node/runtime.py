"""Status files of the node's processes under <data>/run/, read by `status` and metrics.

    run/status.json            the serving process (SCP, completion, delivery)
    run/worker-<host>-<pid>.json  each inference worker process
    run/receiver-<n>.json      each further receiving process of serve ([dicom] receive_processes)
Each process rewrites its file every few seconds; a stale file means a process that died.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

STATUS_FILE = Path("run") / "status.json"
WORKER_STATUS_GLOB = "worker-*.json"
RECEIVER_STATUS_GLOB = "receiver-*.json"


def receiver_status_file(index: int) -> Path:
    return Path("run") / f"receiver-{index}.json"


def clear_receiver_states(data_dir: Path) -> None:
    """Remove receivers' status files (serve, before it starts its receivers: a receiver that
    was killed cannot remove its own, and its counts must not be added again)."""
    for path in (data_dir / "run").glob(RECEIVER_STATUS_GLOB):
        path.unlink(missing_ok=True)


def receiver_counters(data_dir: Path) -> list[dict[str, int]]:
    """The C-STORE counts each receiver last wrote (every 2 s) to its status file."""
    counts = []
    for path in sorted((data_dir / "run").glob(RECEIVER_STATUS_GLOB)):
        state = read_runtime_state(data_dir, path)
        if state is not None:
            counts.append(dict(state.get("scp", {}).get("counters", {})))
    return counts


def read_runtime_state(data_dir: Path, path: Path | None = None) -> dict[str, Any] | None:
    path = path or data_dir / STATUS_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    age = time.time() - path.stat().st_mtime
    state["age_s"] = round(age, 1)
    return state


def read_worker_states(data_dir: Path, max_age_s: float = 30.0) -> list[dict[str, Any]]:
    """States of inference workers on this data directory that wrote recently."""
    states = []
    for path in sorted((data_dir / "run").glob(WORKER_STATUS_GLOB)):
        state = read_runtime_state(data_dir, path)
        if state is not None and state["age_s"] <= max_age_s:
            states.append(state)
    return states
