"""Nothing acknowledged is ever lost: kill -9 the node in the middle of a burst of C-STOREs.

A pynetdicom SCU sends 60 instances in one association from a thread and records which got
Success; the node is killed with SIGKILL after the 20th. Its worker child must go with it.
After a restart every acknowledged instance has its row and a readable file, no temp file is
left, and once the sender has re-sent the rest the study gets a version covering all 60 and a
job.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context

from peers.dicom_files import make_ct_study
from peers.net import wait_for
from peers.node_process import NodeProcess
from storage.db import Database
from tests.nodecheck import (
    FAST_COMPLETION,
    instance_row,
    store_with_pynetdicom,
    temp_files,
    versions_of,
)

pytestmark = pytest.mark.slow

INSTANCES = 60
KILL_AFTER = 20


class BurstSender(threading.Thread):
    """Sends every file in one association; remembers the SOP UIDs that got Success."""

    def __init__(self, port: int, paths: list[Path]) -> None:
        super().__init__(name="burst-sender", daemon=True)
        self.port = port
        self.paths = paths
        self.acknowledged: list[str] = []
        self.enough = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._send_all()
        except BaseException as exc:  # reported by the test, never lost in the thread
            self.error = exc
        finally:
            self.enough.set()

    def _send_all(self) -> None:
        ae = AE(ae_title="BURST")
        # Short: after the kill the SCU only notices the dead peer when a timeout expires.
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3
        first = pydicom.dcmread(self.paths[0], stop_before_pixels=True)
        ae.requested_contexts = [
            build_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
        ]
        assoc = ae.associate("127.0.0.1", self.port, ae_title="MEDGEMMA")
        assert assoc.is_established
        for path in self.paths:
            if not assoc.is_established:
                return  # the node died: the rest were never acknowledged
            try:
                response = assoc.send_c_store(path)
            except RuntimeError:
                return
            if response and response.get("Status") == 0x0000:
                self.acknowledged.append(str(pydicom.dcmread(path).SOPInstanceUID))
                if len(self.acknowledged) >= KILL_AFTER:
                    self.enough.set()
        assoc.release()


def assert_readable(path: Path, sop_uid: str, original: Path) -> None:
    dataset = pydicom.dcmread(path)
    assert str(dataset.SOPInstanceUID) == sop_uid
    assert dataset.PixelData == pydicom.dcmread(original).PixelData


def test_kill9_during_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    paths = make_ct_study(tmp_path / "ct", slices=INSTANCES)
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    (tmp_path / "node").mkdir()
    node = NodeProcess(tmp_path / "node", {"completion": FAST_COMPLETION})
    node.start()
    db: Database | None = None
    try:
        sender = BurstSender(node.port, paths)
        sender.start()
        assert sender.enough.wait(60), "the burst did not reach 20 acknowledgements"
        node.kill9()
        # serve's children (the inference worker) must not outlive it: a restarted serve
        # would otherwise run a second worker beside the orphan.
        wait_for(lambda: not processes_of(node.config_path), 15, message="orphaned child")
        sender.join(30)
        assert not sender.is_alive()
        assert sender.error is None, repr(sender.error)
        acknowledged = list(sender.acknowledged)
        assert len(acknowledged) >= KILL_AFTER
        assert len(acknowledged) < INSTANCES, "the burst finished before the kill"

        node.start()
        db = Database(node.database_url)
        assert temp_files(node.data_dir) == []
        for uid in acknowledged:
            row = instance_row(db, uid)
            assert row is not None, f"acknowledged instance {uid} has no row after the crash"
            assert_readable(node.data_dir / row.path, uid, by_uid[uid])

        # The interrupted study completes after its quiet period, with what was received.
        received = frozenset(acknowledged)
        assert wait_for(lambda: _version_covering(db, study_uid, received, exact=False), 20)

        # The modality re-sends what was not acknowledged (and, not knowing, some that were).
        statuses = store_with_pynetdicom(node.port, paths[len(acknowledged) - 5 :])
        assert statuses == [0x0000] * len(statuses)
        everything = frozenset(by_uid)
        assert wait_for(lambda: _version_covering(db, study_uid, everything), 20)
        assert temp_files(node.data_dir) == []
    finally:
        if db is not None:
            db.dispose()
        node.terminate()


def processes_of(config: Path) -> list[int]:
    """Processes started with this node's config file on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(config).encode() in command_line:
            found.append(int(entry.name))
    return found


def _version_covering(
    db: Database, study_uid: str, uids: frozenset[str], exact: bool = True
) -> bool:
    """A version with a job covering ``uids`` (exactly, or at least them)."""
    for version in versions_of(db, study_uid):
        covers = version.instances == uids if exact else version.instances >= uids
        if covers and version.job_id is not None:
            return True
    return False
