"""`medgemma-node self-check`: the report of how the installation handles data, and exit 1 on
each unsafe setting the issue lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from peers.node_process import write_toml
from storage.db import Database
from storage.models import UserRole
from storage.users import create_user

runner = CliRunner()

SAFE: dict[str, Any] = {
    "dicom": {"bind_address": "0.0.0.0", "allowed_calling_aets": ["CR_ROOM1"],
              "tls": {"enabled": True, "cert_file": "/etc/n.pem", "key_file": "/etc/n.key"}},
    "api": {"host": "127.0.0.1"},
    "metrics": {"bind_address": "127.0.0.1"},
    "destinations": [
        {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
        {"name": "his", "kind": "hl7", "host": "127.0.0.1", "port": 2575},
    ],
}  # fmt: skip


def self_check(tmp_path: Path, sections: dict[str, Any], users: bool = True) -> tuple[int, Any]:
    from medgemma_node.cli import app

    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    if users:
        db = Database(f"sqlite:///{(data_dir / 'node.db').resolve()}")
        db.upgrade()
        create_user(db, "dr-wang", UserRole.RADIOLOGIST)
        db.dispose()
    config = write_toml(
        tmp_path / "node.toml", {**sections, "storage": {"data_dir": str(data_dir)}}
    )
    result = runner.invoke(app, ["self-check", "--json", "--config", str(config)])
    return result.exit_code, json.loads(result.stdout)


def levels(report: dict[str, Any]) -> dict[str, str]:
    return {finding["topic"]: finding["level"] for finding in report["findings"]}


def test_a_safe_installation_passes_and_describes_its_data_flows(tmp_path: Path) -> None:
    code, report = self_check(tmp_path, SAFE)
    assert code == 0 and report["unsafe"] == 0
    found = levels(report)
    assert found["dicom.tls"] == "ok" and found["api.users"] == "ok"
    assert found["destinations.pacs"] == "warn"  # results in clear to another machine
    assert found["destinations.his"] == "ok"  # loopback
    assert any("C-STORE from CR_ROOM1" in flow and "(TLS)" in flow for flow in report["data_flows"])
    assert any(
        flow.startswith("out: pacs (dicom) to 10.0.0.5 (no TLS)") for flow in report["data_flows"]
    )
    assert report["versions"]["medgemma-node"] and report["versions"]["pynetdicom"]


@pytest.mark.parametrize(
    ("change", "topic"),
    [
        ({"dicom": {"bind_address": "127.0.0.1"}}, "dicom.allowed_calling_aets"),
        ({"dicom": {"bind_address": "0.0.0.0", "allowed_calling_aets": ["A"]}}, "dicom.tls"),
        ({"api": {"host": "0.0.0.0"}}, "api.tls"),
        ({"metrics": {"bind_address": "0.0.0.0"}}, "metrics"),
        ({}, "api.users"),
    ],
)
def test_each_unsafe_setting_fails(tmp_path: Path, change: dict[str, Any], topic: str) -> None:
    code, report = self_check(tmp_path, {**SAFE, **change}, users=bool(change))
    assert code == 1 and report["unsafe"] == 1, report["findings"]
    assert levels(report)[topic] == "unsafe"
