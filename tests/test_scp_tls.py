"""DICOM TLS at the listener (PS3.15 Annex B.9) against DCMTK's echoscu: refused handshakes are
logged with the peer address and the reason, and a client that connects and says nothing
neither blocks other associations nor stays connected."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.net import wait_for
from peers.node_process import NodeProcess

pytestmark = pytest.mark.slow

MODALITY = "MODALITY1"
ACSE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Self-signed: the node's, a trusted modality's and a stranger's (trusted by nobody)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    folder = tmp_path_factory.mktemp("certs")
    for name in ("node", "modality", "stranger"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt"),
             "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    return folder


def echoscu(port: int, *tls: str) -> subprocess.CompletedProcess[str]:
    """DCMTK's echoscu (not pynetdicom's script of the same name)."""
    return subprocess.run(
        ["/usr/bin/echoscu", *tls, "-aet", MODALITY, "-aec", "MEDGEMMA", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, certificates: Path) -> Iterator[NodeProcess]:
    tls = {
        "enabled": True,
        "cert_file": str(certificates / "node.crt"),
        "key_file": str(certificates / "node.key"),
        "ca_file": str(certificates / "modality.crt"),
        "require_client_cert": True,
    }
    sections = {
        "dicom": {"acse_timeout_s": ACSE_TIMEOUT_S, "tls": tls},
        "storage": {"min_free_disk_mb": 0},
    }
    process = NodeProcess(tmp_path_factory.mktemp("tls-node"), sections).start(wait=False)
    try:
        # Readiness by TLS: the helper's plain C-ECHO cannot reach a TLS listener.
        wait_for(
            lambda: trusted_echo(process, certificates).returncode == 0,
            60,
            interval=0.5,
            message=f"TLS node did not answer:\n{process.stderr()}",
        )
        yield process
    finally:
        process.terminate()


def trusted_echo(node: NodeProcess, certificates: Path) -> subprocess.CompletedProcess[str]:
    return echoscu(
        node.port,
        "+tls", str(certificates / "modality.key"), str(certificates / "modality.crt"),
        "+cf", str(certificates / "node.crt"),
    )  # fmt: skip


def refusal_lines(node: NodeProcess) -> list[str]:
    log = (node.data_dir / "logs" / "node.log").read_text(errors="replace")
    return [line for line in log.splitlines() if "TLS handshake from 127.0.0.1:" in line]


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("no certificate", "the client sent no certificate (PEER_DID_NOT_RETURN_A_CERTIFICATE)"),
        ("another CA", "the client certificate is not from a trusted CA"),
        ("plain TCP", "not TLS (plain DICOM to the TLS port?)"),
    ],
)
def test_refused_handshake_is_logged_with_peer_and_reason(
    node: NodeProcess, certificates: Path, client: str, reason: str
) -> None:
    options = {
        "no certificate": ["+tla", "+cf", str(certificates / "node.crt")],
        "another CA": [
            "+tls", str(certificates / "stranger.key"), str(certificates / "stranger.crt"),
            "+cf", str(certificates / "node.crt"),
        ],
        "plain TCP": [],
    }[client]  # fmt: skip
    before = len(refusal_lines(node))
    result = echoscu(node.port, *options)
    assert result.returncode != 0
    assert "Association Request Failed" in result.stderr
    new_lines = wait_for(
        lambda: refusal_lines(node)[before:], 10, message="no log line for the refusal"
    )
    assert len(new_lines) == 1
    assert "refused: " + reason in new_lines[0]
    assert trusted_echo(node, certificates).returncode == 0


def test_a_silent_client_blocks_nobody_and_is_closed(node: NodeProcess, certificates: Path) -> None:
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        port = silent.getsockname()[1]
        # While it says nothing, others still get through (the handshake is not done on the
        # thread that accepts connections).
        assert trusted_echo(node, certificates).returncode == 0
        silent.settimeout(30)  # a bound for the test only: the node closes after 3 s
        assert silent.recv(10) == b""  # closed by the node
    line = wait_for(
        lambda: [x for x in refusal_lines(node) if f"127.0.0.1:{port} " in x],
        10,
        message="no log line for the silent client",
    )
    assert "no handshake within dicom.acse_timeout_s (3.0 s)" in line[0]
