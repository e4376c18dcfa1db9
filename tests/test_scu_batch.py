"""dicom_node.scu.store_batch against real peers: a pynetdicom SCP answering scripted C-STORE
statuses (PS3.4 B.2.3), Orthanc refusing JPEG 2000 (the Explicit VR Little Endian fallback),
and Orthanc over mutual DICOM TLS (PS3.15 B.9)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.transport import ThreadedAssociationServer

from config.settings import DicomDestination, TLSSettings
from dicom_node.scu import judge_store_status, store_batch
from peers.dicom_files import testdata as bundled_file
from peers.net import free_port
from peers.orthanc import OrthancServer
from storage.delivery_types import Verdict
from tests.delivery_rows import BASIC_TEXT_SR, write_basic_text_sr

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def destination(port: int, tls: TLSSettings | None = None) -> DicomDestination:
    return DicomDestination(
        kind="dicom",
        name="pacs",
        ae_title="PACS",
        host="127.0.0.1",
        port=port,
        tls=tls or TLSSettings(),
    )


class ScriptedSCP:
    """A Storage SCP that answers each SOP Instance UID with a scripted status (or aborts)."""

    ABORT = -1

    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses
        self.associations = 0
        self.stored: list[str] = []
        ae = AE("PACS")
        ae.add_supported_context(BASIC_TEXT_SR, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_ACCEPTED, self._accepted),
            ],
        )
        assert server is not None
        self.server: ThreadedAssociationServer = server

    def _accepted(self, _event: evt.Event) -> None:
        self.associations += 1

    def _store(self, event: evt.Event) -> int:
        sop_uid = str(event.dataset.SOPInstanceUID)
        status = self.statuses.get(sop_uid, 0x0000)
        if status == self.ABORT:
            event.assoc.abort()
            return 0xA700
        self.stored.append(sop_uid)
        return status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def sr_files(tmp_path: Path) -> list[Path]:
    paths = []
    for number in range(1, 7):
        path = tmp_path / f"sr{number}.dcm"
        write_basic_text_sr(path, STUDY_UID, f"{STUDY_UID}.{number}", number)
        paths.append(path)
    return paths


def test_statuses_decide_each_file_over_one_association(
    sr_files: list[Path], tmp_path: Path
) -> None:
    uids = [f"{STUDY_UID}.{number}" for number in range(1, 7)]
    scp = ScriptedSCP({uids[1]: 0xB000, uids[2]: 0xA700, uids[3]: 0xA900, uids[4]: 0xC123})
    not_dicom = tmp_path / "not.dcm"
    not_dicom.write_bytes(b"not DICOM")
    unsupported = bundled_file("CT_small.dcm")  # the SCP takes no CT Image Storage
    try:
        outcomes = store_batch(
            [*sr_files[:5], not_dicom, unsupported], destination(scp.port), "MEDGEMMA"
        )
    finally:
        scp.close()
    assert scp.associations == 1
    assert [(o.verdict, o.code) for o in outcomes] == [
        (Verdict.DELIVERED, "0x0000"),
        (Verdict.DELIVERED, "0xB000"),  # warning: stored with coercion
        (Verdict.RETRY, "0xA700"),  # out of resources
        (Verdict.REJECTED, "0xA900"),  # data set does not match SOP class
        (Verdict.REJECTED, "0xC123"),  # cannot understand
        (Verdict.REJECTED, "no-status"),
        (Verdict.REJECTED, "no-status"),
    ]
    assert "0xA900" in outcomes[3].reason
    assert "not a readable DICOM file" in outcomes[5].reason
    assert "no presentation context" in outcomes[6].reason


def test_association_lost_mid_batch_leaves_the_rest_to_retry(sr_files: list[Path]) -> None:
    scp = ScriptedSCP({f"{STUDY_UID}.2": ScriptedSCP.ABORT})
    try:
        outcomes = store_batch(sr_files[:4], destination(scp.port), "MEDGEMMA", timeout_s=5)
    finally:
        scp.close()
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED] + [Verdict.RETRY] * 3
    assert outcomes[2].reason == outcomes[3].reason == "association lost"


def test_nothing_listening_makes_every_file_retry(sr_files: list[Path]) -> None:
    outcomes = store_batch(sr_files[:3], destination(free_port()), "MEDGEMMA", timeout_s=2)
    assert {o.verdict for o in outcomes} == {Verdict.RETRY}
    assert all(o.destination_down for o in outcomes)
    assert all("association failed" in o.reason for o in outcomes)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (0x0000, Verdict.DELIVERED),
        (0xB007, Verdict.DELIVERED),
        (0xA701, Verdict.RETRY),
        (0x0213, Verdict.RETRY),
        (None, Verdict.RETRY),
        (0x0122, Verdict.REJECTED),
        (0x0124, Verdict.REJECTED),
        (0xC000, Verdict.REJECTED),
        (0x0212, Verdict.REJECTED),
        (0xFE00, Verdict.RETRY),
    ],
)
def test_store_status_classes(status: int | None, verdict: Verdict) -> None:
    assert judge_store_status(status) is verdict


@pytest.mark.parametrize(
    ("j2k_accepted", "stored_as"), [(True, JPEG2000Lossless), (False, ExplicitVRLittleEndian)]
)
def test_compressed_file_uses_its_own_syntax_or_the_uncompressed_fallback(
    tmp_path: Path, j2k_accepted: bool, stored_as: str
) -> None:
    config = {"Jpeg2000TransferSyntaxAccepted": j2k_accepted}
    with OrthancServer(tmp_path / "orthanc", extra_config=config) as pacs:
        (outcome,) = store_batch([bundled_file("RG1_J2KR.dcm")], destination(pacs.dicom_port), "MG")
        assert outcome.verdict is Verdict.DELIVERED, outcome.reason
        (orthanc_id,) = pacs.instance_ids()
        assert pacs.instance_metadata(orthanc_id, "TransferSyntax") == stored_as
        assert pacs.instance_tags(orthanc_id)["Rows"] == "1955"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A PACS certificate for 127.0.0.1 and a node client certificate, both self-signed."""
    folder = tmp_path_factory.mktemp("tls")
    for name, subject, extension in (
        ("pacs", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1"),
        ("node", "/CN=medgemma-node", "subjectAltName=DNS:medgemma-node"),
    ):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt"),
             "-subj", subject, "-addext", extension],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    yield folder


def test_mutual_tls_to_orthanc(tmp_path: Path, certificates: Path, sr_files: list[Path]) -> None:
    config = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certificates / "pacs.crt"),
        "DicomTlsPrivateKey": str(certificates / "pacs.key"),
        "DicomTlsTrustedCertificates": str(certificates / "node.crt"),
        "DicomTlsRemoteCertificateRequired": True,
    }
    trusted, untrusted = (
        TLSSettings(
            enabled=True,
            ca_file=certificates / ca,
            cert_file=certificates / "node.crt",
            key_file=certificates / "node.key",
        )
        for ca in ("pacs.crt", "node.crt")
    )
    with OrthancServer(tmp_path / "orthanc", extra_config=config) as pacs:
        port = pacs.dicom_port
        (plain,) = store_batch(sr_files[:1], destination(port), "MG", timeout_s=5)
        (wrong_ca,) = store_batch(sr_files[:1], destination(port, untrusted), "MG", timeout_s=5)
        outcomes = store_batch(sr_files[:2], destination(port, trusted), "MG", timeout_s=5)
        stored = sorted(pacs.sop_instance_uids())
    assert plain.verdict is wrong_ca.verdict is Verdict.RETRY
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED] * 2
    assert stored == [f"{STUDY_UID}.1", f"{STUDY_UID}.2"]
