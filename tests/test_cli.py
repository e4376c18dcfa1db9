"""The `medgemma-node` command line against a real `serve` subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from medgemma_node.pidfile import PID_FILE
from medgemma_node.service import STATUS_FILE
from peers.dicom_files import make_ct_study
from peers.net import free_port
from peers.node_process import NodeProcess, run_cli
from storage.db import Database
from tests.nodecheck import FAST_COMPLETION, instance_row

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path_factory.mktemp("cli"), {"completion": FAST_COMPLETION})
    process.start()
    try:
        yield process
    finally:
        process.terminate()


def test_echo_running_node(node: NodeProcess) -> None:
    result = run_cli("echo", "127.0.0.1", str(node.port), "--aec", "MEDGEMMA")
    assert result.returncode == 0, result.stderr
    assert f"MEDGEMMA@127.0.0.1:{node.port}: success" in result.stdout


def test_echo_closed_port() -> None:
    port = free_port()  # nothing listens there
    result = run_cli("echo", "127.0.0.1", str(port))
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_send_folder_then_status(node: NodeProcess, tmp_path: Path) -> None:
    folder = tmp_path / "to-send"
    paths = make_ct_study(folder / "series1", slices=3)
    (folder / "README.txt").write_text("not DICOM")  # skipped with a warning, not fatal
    result = run_cli("send", str(folder), "--port", str(node.port), "--aet", "CLI_SCU")
    assert result.returncode == 0, result.stderr
    assert "sent 3, warnings 0, failed 0, not accepted 0" in result.stdout
    assert "3/3" in result.stderr  # the progress bar's final count
    assert "skipped" in result.stderr and "README.txt" in result.stderr

    db = Database(node.database_url)
    try:
        for path in paths:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            row = instance_row(db, uid)
            assert row is not None and row.calling_ae == "CLI_SCU"
    finally:
        db.dispose()

    status = run_cli("status", "--config", str(node.config_path), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["scp"]["port"] == node.port
    assert report["scp"]["echo_ok"] is True
    assert node.proc is not None and report["process"]["pid"] == node.proc.pid
    assert report["database"]["studies"] >= 1
    assert report["database"]["instances"] >= 3
    assert report["disk_free_mb"] > 0


def test_send_to_closed_port_fails_clearly(tmp_path: Path) -> None:
    paths = make_ct_study(tmp_path / "ct", slices=1)
    port = free_port()
    result = run_cli("send", str(paths[0]), "--port", str(port))
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr


def test_status_of_a_stopped_node(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    port = free_port()
    config.write_text(f'[dicom]\nport = {port}\n[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    result = run_cli("status", "--config", str(config), "--json")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["scp"]["echo_ok"] is False
    assert report["process"] is None


def sigterm_exit_code(node: NodeProcess, timeout_s: float) -> int:
    """SIGTERM ``node`` and wait for it; a node still running after ``timeout_s`` is killed
    and the test fails."""
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    try:
        return node.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        node.kill9()
        pytest.fail(f"serve did not stop within {timeout_s:.0f} s of SIGTERM")


def test_sigterm_stops_serve_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, {"completion": FAST_COMPLETION}).start()
    status_file = node.data_dir / STATUS_FILE
    assert status_file.is_file()
    assert node.proc is not None
    started = time.monotonic()
    assert sigterm_exit_code(node, 10) == 0, node.stderr()
    assert time.monotonic() - started < 5
    assert not status_file.exists()
    assert "medgemma_node.service: stopped" in node.log_text()


def test_sigterm_while_serve_starts_stops_it_in_order(tmp_path: Path) -> None:
    """The signal is caught before the pid file is written: a SIGTERM sent as soon as the
    file exists, while the parts are still starting, stops the node in order (exit 0)."""
    node = NodeProcess(tmp_path, {"completion": FAST_COMPLETION}).start(wait=False)
    assert node.proc is not None
    pid_file = node.data_dir / PID_FILE
    deadline = time.monotonic() + 60
    while not pid_file.exists() and node.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pid_file.exists(), node.stderr()
    assert sigterm_exit_code(node, 30) == 0, node.stderr()
    assert "medgemma_node.service: stopped" in node.log_text()
    assert not pid_file.exists()


def test_db_upgrade_on_a_fresh_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    result = run_cli("db", "upgrade", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert "revision head" in result.stdout
    db = Database(f"sqlite:///{data_dir / 'node.db'}")
    try:
        assert db.is_current()
    finally:
        db.dispose()
    again = run_cli("db", "upgrade", "--data-dir", str(data_dir))  # idempotent
    assert again.returncode == 0, again.stderr
