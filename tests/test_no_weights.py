"""Without MedGemma weights the node keeps receiving, holds the jobs and says how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, testdata
from peers.net import wait_for
from peers.node_process import NodeProcess, run_cli


@pytest.mark.slow
def test_missing_weights_hold_jobs_and_say_where_was_searched(tmp_path: Path) -> None:
    weights_dir = tmp_path / "no-such-weights"
    sections = {
        "completion": {"default_seconds": 0.5, "poll_interval_s": 0.1, "rules": []},
        "model": {"model_path": str(weights_dir)},
    }
    node = NodeProcess(tmp_path / "node", sections, extra_env={"HF_HOME": str(tmp_path / "hf")})
    node.start()
    try:
        image = copy_with_new_uids(testdata("RG1_UNCI.dcm"), tmp_path / "in" / "rg1.dcm")
        assert dcmtk_storescu(node.port, [image]).returncode == 0

        def held_status() -> dict[str, object] | None:
            result = run_cli("status", "--config", str(node.config_path), "--json")
            status = json.loads(result.stdout) if result.returncode == 0 else None
            if not status or not status["workers"] or not status["database"]["jobs"].get("queued"):
                return None
            model_status = status["workers"][0].get("model", {}).get("status")
            return dict(status) if model_status not in (None, "not loaded") else None

        status = wait_for(held_status, 60, message="no queued job with a worker reporting")
        logs = node.log_text()
    finally:
        assert node.terminate() == 0
    [worker] = status["workers"]  # type: ignore[misc]
    model = worker["model"]
    assert model["status"] == "missing weights"
    assert str(weights_dir) in model["message"] and "model_path" in model["message"]
    assert status["database"]["jobs"] == {"queued": 1}  # type: ignore[index]
    assert str(weights_dir) in logs and "never downloads" in logs
