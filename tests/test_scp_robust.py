"""The listener against peers that misbehave: garbage after a valid request, silence, idle
associations, a PDU cut short, the wrong called AE title, pixel data shorter than the image.

Each test uses a real peer (a raw socket speaking PS3.8 PDUs, pynetdicom, DCMTK's storescu or
the node's own CLI), checks what the peer got and what the node logged, and that the node
still serves.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config.settings import NodeSettings
from dicom_node.scp import StorageSCP
from dicom_node.statuses import describe_rejection, describe_status
from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import make_ct_study
from peers.dicom_files import testdata as bundled_file
from peers.net import echo_ok, wait_for
from peers.node_process import NodeProcess, run_cli, write_toml
from storage.db import Database
from tests.nodecheck import instance_row, store_with_pynetdicom

pytestmark = pytest.mark.slow

MODALITY = "MODALITY1"
RAW_AET = "RAWPEER"
NODE_AET = "MEDGEMMA"
CLI_NODE_AET = "CLI_NODE"  # the AE title of a second node's config, allowed to call this one
ACSE_TIMEOUT_S = 2.0
NETWORK_TIMEOUT_S = 3.0
CLOSE_BOUND_S = 30.0  # generous: the timeouts above are what closes; this only bounds the test

A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
A_ABORT = 0x07


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    sections = {
        "dicom": {
            "ae_title": NODE_AET,
            "allowed_calling_aets": [MODALITY, RAW_AET, CLI_NODE_AET, "PROBE"],
            "acse_timeout_s": ACSE_TIMEOUT_S,
            "network_timeout_s": NETWORK_TIMEOUT_S,
        },
        "storage": {"min_free_disk_mb": 0},
        "completion": {"default_seconds": 600, "rules": []},
    }
    process = NodeProcess(tmp_path_factory.mktemp("robust"), sections).start()
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def node_db(node: NodeProcess) -> Iterator[Database]:
    database = Database(node.database_url)
    yield database
    database.dispose()


def log_file_text(node: NodeProcess) -> str:
    """The node's log file only (stderr repeats every line)."""
    return (node.data_dir / "logs" / "node.log").read_text(errors="replace")


def problem_lines(node: NodeProcess, needle: str) -> list[str]:
    """WARNING and ERROR lines of the log file that mention ``needle``."""
    return [
        line
        for line in log_file_text(node).splitlines()
        if needle in line and re.search(r" (WARNING|ERROR) ", line)
    ]


# -- raw PDUs (PS3.8 §9.3) ---------------------------------------------------------------------


def pdu_item(item_type: int, value: bytes) -> bytes:
    """An item of a variable field: type, reserved, 2-byte length (PS3.8 §9.3.2.1–3)."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(called: str = NODE_AET, calling: str = RAW_AET) -> bytes:
    """A complete A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    application_context = pdu_item(0x10, b"1.2.840.10008.3.1.1.1")
    presentation_context = pdu_item(
        0x20,
        bytes([1, 0, 0, 0])  # context id 1, reserved
        + pdu_item(0x30, b"1.2.840.10008.1.1")  # abstract syntax: Verification
        + pdu_item(0x40, b"1.2.840.10008.1.2"),  # transfer syntax: Implicit VR LE
    )
    user_information = pdu_item(
        0x50,
        pdu_item(0x51, struct.pack(">I", 16384))  # maximum length
        + pdu_item(0x52, b"1.2.826.0.1.3680043.9.9999"),  # implementation class UID
    )
    body = (
        struct.pack(">HH", 1, 0)  # protocol version 1, reserved
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + application_context
        + presentation_context
        + user_information
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def first_pdu_type(sock: socket.socket) -> int | None:
    """The type of the next PDU the node sends (read whole); None when it closed instead."""
    header = read_exactly(sock, 6)
    if len(header) < 6:
        return None
    pdu_type, _reserved, length = struct.unpack(">BBI", header)
    read_exactly(sock, length)
    return int(pdu_type)


def pdu_types_until_abort(sock: socket.socket, limit: int = 8) -> list[int | None]:
    """PDU types the node sends, up to its A-ABORT or the connection's close."""
    types: list[int | None] = []
    while len(types) < limit and (not types or types[-1] not in (A_ABORT, None)):
        types.append(first_pdu_type(sock))
    return types


def wait_closed(sock: socket.socket, bound_s: float = CLOSE_BOUND_S) -> bool:
    """True once the node closes the connection (recv returns b''), reading what it sends."""
    sock.settimeout(bound_s)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def connect(node: NodeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=CLOSE_BOUND_S)


# -- protocol violations and timeouts --------------------------------------------------------


def test_garbage_after_a_valid_request_is_one_log_line(node: NodeProcess) -> None:
    """PS3.8 §9.2 AA-8: an invalid PDU gets A-ABORT; the node logs it once, keeps serving."""
    ports = []
    for _attempt in range(4):
        with connect(node) as sock:
            sock.sendall(associate_rq() + b"\xde\xad\xbe\xef" * 64)
            # The answer to the request may or may not come before the abort (a race in the
            # node, harmless): the abort must come.
            assert pdu_types_until_abort(sock)[-1] == A_ABORT
            ports.append(sock.getsockname()[1])
    assert echo_ok(node.port, calling_aet=RAW_AET)

    def every_abort_logged() -> bool:
        return all(problem_lines(node, f"127.0.0.1:{port})") for port in ports)

    wait_for(every_abort_logged, 20, message="abort lines missing from the log")
    for port in ports:
        (line,) = problem_lines(node, f"127.0.0.1:{port}")
        assert "aborted: the peer sent an invalid PDU" in line
    assert "Unknown PDU type" not in log_file_text(node)
    assert "Traceback" not in node.stderr()
    assert "InvalidEventError" not in node.log_text()


def test_a_connection_that_sends_nothing_is_closed(node: NodeProcess) -> None:
    with connect(node) as sock:
        port = sock.getsockname()[1]
        assert wait_closed(sock), "a silent connection stayed open"
    wait_for(
        lambda: f"127.0.0.1:{port} closed: no association request" in log_file_text(node),
        10,
        message="no log line for the silent connection",
    )
    assert echo_ok(node.port, calling_aet=RAW_AET)


def test_an_idle_association_is_aborted(node: NodeProcess) -> None:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    port = assoc.requestor.port
    wait_for(lambda: not assoc.is_established, CLOSE_BOUND_S, message="idle association open")
    assert assoc.is_aborted
    wait_for(
        lambda: problem_lines(node, f"127.0.0.1:{port}) aborted: idle"),
        10,
        message="no log line for the idle association",
    )


def test_a_pdu_cut_short_does_not_hold_the_connection(node: NodeProcess) -> None:
    """An association whose peer stops after two bytes of a PDU header is closed too."""
    with connect(node) as sock:
        sock.sendall(associate_rq())
        assert first_pdu_type(sock) == A_ASSOCIATE_AC
        sock.sendall(b"\x04\x00")  # the start of a P-DATA-TF header, then nothing
        assert wait_closed(sock), "a connection stuck in the middle of a PDU stayed open"
    assert echo_ok(node.port, calling_aet=RAW_AET)


# -- association negotiation ----------------------------------------------------------------


def test_wrong_called_ae_title_is_rejected(
    node: NodeProcess, node_db: Database, tmp_path: Path
) -> None:
    """PS3.8 §9.3.4: rejected-permanent (1), service-user (1), called AE not recognised (7)."""
    (path,) = make_ct_study(tmp_path / "ct", slices=1)
    result = dcmtk_storescu(node.port, [path], aet=MODALITY, aec="WRONGAE")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert "Result: Rejected Permanent, Source: Service User" in result.stderr
    assert "Reason: Called AE Title Not Recognized" in result.stderr
    sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert instance_row(node_db, sop_uid) is None
    wait_for(
        lambda: problem_lines(node, "called 'WRONGAE': rejected permanently"),
        10,
        message="no log line for the rejection",
    )
    (line,) = problem_lines(node, "called 'WRONGAE'")
    assert "called AE title not recognised (result 1, source 1, reason 7)" in line
    # The raw request with the right called AE title is accepted by the same node.
    with connect(node) as sock:
        sock.sendall(associate_rq(called="WRONGAE"))
        assert first_pdu_type(sock) == A_ASSOCIATE_RJ
    with connect(node) as sock:
        sock.sendall(associate_rq(called=NODE_AET))
        assert first_pdu_type(sock) == A_ASSOCIATE_AC


@pytest.mark.parametrize("required", [True, False])
def test_require_called_aet_reaches_the_ae(tmp_path: Path, required: bool) -> None:
    settings = NodeSettings.model_validate(
        {"dicom": {"require_called_aet": required}, "storage": {"data_dir": tmp_path}}
    )
    ae = StorageSCP(settings, db=None, salt=b"").build_ae()  # type: ignore[arg-type]
    assert ae.require_called_aet is required
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (30.0, 60.0, 60.0)


# -- pixel data -----------------------------------------------------------------------------


def ct_with_pixels(**changes: object) -> Dataset:
    dataset = pydicom.dcmread(bundled_file("CT_small.dcm"))
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    return dataset


def short_pixel_cases() -> dict[str, Dataset]:
    full = pydicom.dcmread(bundled_file("CT_small.dcm")).PixelData  # 128 x 128 x 16 bit
    return {
        "one row short": ct_with_pixels(PixelData=full[: -128 * 2]),
        "second frame missing": ct_with_pixels(NumberOfFrames=2, PixelData=full),
        "no Rows": ct_with_pixels(Rows=None),
    }


@pytest.mark.parametrize("case", sorted(short_pixel_cases()))
def test_native_pixel_data_shorter_than_the_image_is_a900(
    node: NodeProcess, node_db: Database, case: str
) -> None:
    dataset = short_pixel_cases()[case]
    assert store_with_pynetdicom(node.port, [dataset], aet=MODALITY) == [0xA900]
    assert instance_row(node_db, str(dataset.SOPInstanceUID)) is None
    assert list((node.data_dir / "instances").rglob(f"{dataset.SOPInstanceUID}.dcm")) == []
    (good,) = make_ct_study(node.workdir / f"good-{generate_uid()[-8:]}", slices=1)
    assert store_with_pynetdicom(node.port, [good], aet=MODALITY) == [0x0000]


def test_short_pixel_data_from_dcmtk_gets_a900_with_a_reason(
    node: NodeProcess, tmp_path: Path
) -> None:
    full = pydicom.dcmread(bundled_file("CT_small.dcm")).PixelData
    dataset = ct_with_pixels(PixelData=full[:1000])
    path = tmp_path / "short.dcm"
    dataset.save_as(path, enforce_file_format=True)
    result = dcmtk_storescu(node.port, [path], "-v", aet=MODALITY)
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in result.stderr
    # The Error Comment (0000,0902) says why, for any SCU that shows it.
    ae = AE(ae_title=MODALITY)
    ae.requested_contexts = [build_context(dataset.SOPClassUID, "1.2.840.10008.1.2.1")]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    assert response.Status == 0xA900
    assert response.ErrorComment == "pixel data 1000 bytes, image needs 32768"


# -- the command line -----------------------------------------------------------------------


def test_cli_echo_prints_the_rejection_reason(node: NodeProcess) -> None:
    result = run_cli("echo", "127.0.0.1", str(node.port), "--aet", MODALITY, "--aec", "WRONGAE")
    assert result.returncode == 1
    assert describe_rejection(1, 1, 7) in result.stderr
    assert "rejected permanently by the service user" in result.stderr
    assert "called AE title not recognised" in result.stderr


def test_cli_takes_the_calling_ae_title_from_config(node: NodeProcess, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "other-node.toml", {"dicom": {"ae_title": CLI_NODE_AET}})
    without = run_cli("echo", "127.0.0.1", str(node.port), "--aec", NODE_AET)
    assert without.returncode == 1
    assert "calling AE title not recognised" in without.stderr
    with_config = run_cli(
        "echo", "127.0.0.1", str(node.port), "--aec", NODE_AET, "--config", str(config)
    )
    assert with_config.returncode == 0, with_config.stderr
    assert "success" in with_config.stdout
    assert f"association accepted from {CLI_NODE_AET}" in log_file_text(node)


def test_cli_send_prints_the_status_meaning(node: NodeProcess, tmp_path: Path) -> None:
    full = pydicom.dcmread(bundled_file("CT_small.dcm")).PixelData
    path = tmp_path / "short.dcm"
    ct_with_pixels(PixelData=full[:1000]).save_as(path, enforce_file_format=True)
    config = write_toml(tmp_path / "sender.toml", {"dicom": {"ae_title": CLI_NODE_AET}})
    result = run_cli("send", str(path), "--port", str(node.port), "--config", str(config))
    assert result.returncode == 1
    assert "failed 1" in result.stdout
    expected = describe_status(0xA900, "pixel data 1000 bytes, image needs 32768")
    assert expected == (
        "0xA900 Error: Data Set does not match SOP Class (pixel data 1000 bytes, image needs 32768)"
    )
    assert expected in result.stderr.replace("\n", "")
