"""The delivery worker: sends outbox rows to their destinations, backs off, dead-letters.

    worker = DeliveryWorker.from_settings(settings, db)
    node.add_part("delivery", worker)     # start(); stop() at shutdown
    worker.wake()                         # optional: rows were just written, look now

One lane — a thread — per enabled destination, so a destination that times out only ever
delays its own rows (design.md: one bad destination never blocks the others). A lane claims the
destination's due rows (storage.outbox: lease, attempt counted), hands them to the sender for
the destination's kind and records each verdict:

    DELIVERED  -> SENT, sent_at
    RETRY      -> pending again at now + min(initial_backoff_s * 2**(attempts-1), max_backoff_s)
                  (at least the peer's Retry-After), or DEAD after max_attempts / max_age_s
    REJECTED   -> DEAD at once; last_error keeps the reason

Nothing is built at send time: each row's payload file was written with the report, so a
crash between sending and marking SENT re-sends the very same bytes (same SR SOP Instance UID,
same HL7 MSH-10, same Idempotency-Key).

Outbox rows, as this worker reads them (``kind`` is the destination's kind):
    dicom  object_id -> the report_objects row; payload_path = that object's DICOM file.
           The rows of one destination that are due together go over one association.
    hl7    payload_path = the ORU^R01 as ER7 text, UTF-8, segments ended by CR;
           message_id = its MSH-10 (checked before sending).
    http   payload_path = the JSON document POSTed as is; message_id = Idempotency-Key.
    file   payload_path = the JSON report: the report's set is written (its DICOM objects when
           copy_dicom, reports/<id>/oru-<destination name>.hl7 when write_hl7, then the
           JSON). A row with object_id set, or with an .hl7 payload, is that one file.
Paths are relative to the data directory. Logs carry row ids, UIDs / control ids,
destination names and status codes only; the peers' own words go to last_error.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import httpx

from config.settings import (
    DicomDestination,
    FileDestination,
    HL7Destination,
    HttpDestination,
    NodeSettings,
    RetryPolicy,
)
from dicom_node.scu import StoreOutcome, StoreVerdict, store_batch
from hl7_out.mllp import DeliveryOutcome, DeliveryStatus, MLLPSender, message_control_id
from medgemma_node.delivery_metrics import DeliveryCounters
from storage.db import Database
from storage.files import uid_component, write_durably
from storage.models import utcnow
from storage.outbox import (
    ClaimedItem,
    Failure,
    claim_due,
    finish,
    note_on_pending,
    pending_routes,
    release_leases,
    report_object_files,
)

log = logging.getLogger("medgemma_node.delivery")

DestinationConfig = DicomDestination | HL7Destination | FileDestination | HttpDestination


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Verdict:
    """One row's result.

    ``reason`` goes to last_error (it may quote the peer); ``code`` is short and PHI-free for
    logs ("0xA700", "AE", "HTTP 503", "ConnectionRefused"). ``destination_down``: the peer
    could not be reached, so the rest of the batch is not tried and shares this verdict.
    """

    outcome: Outcome
    reason: str = ""
    code: str = ""
    destination_down: bool = False
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Parcel:
    """A claimed row and its payload file (absolute)."""

    item: ClaimedItem
    path: Path


class Sender(Protocol):
    """Sends one destination's batch; returns one verdict per parcel, in order. Thread-safe:
    lanes of the same kind call it at the same time."""

    def send(self, destination: DestinationConfig, parcels: Sequence[Parcel]) -> list[Verdict]: ...


def send_each(parcels: Sequence[Parcel], send_one: Callable[[Parcel], Verdict]) -> list[Verdict]:
    """Send parcels one by one; once the destination is down, the rest share that verdict."""
    verdicts: list[Verdict] = []
    for parcel in parcels:
        if verdicts and verdicts[-1].destination_down:
            verdicts.append(verdicts[-1])
            continue
        verdicts.append(_guarded(send_one, parcel))
    return verdicts


def _guarded(send_one: Callable[[Parcel], Verdict], parcel: Parcel) -> Verdict:
    if not parcel.path.is_file():
        reason = f"payload file missing: {parcel.item.payload_path}"
        return Verdict(Outcome.REJECTED, reason, "payload-missing")
    try:
        return send_one(parcel)
    except Exception as exc:  # a sender bug must not kill the lane; the row is retried
        log.exception("outbox row %d: sender failed unexpectedly", parcel.item.id)
        return Verdict(Outcome.RETRY, f"{type(exc).__name__}: {exc}", type(exc).__name__)


# ---------------------------------------------------------------------------------------------
# Senders


class DicomSender:
    """C-STORE over one association per batch (dicom_node.scu.store_batch, PS3.4 B.2.3)."""

    def __init__(self, calling_aet: str, timeout_s: float = 30.0) -> None:
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s

    def send(self, destination: DestinationConfig, parcels: Sequence[Parcel]) -> list[Verdict]:
        assert isinstance(destination, DicomDestination)
        outcomes = store_batch(
            [parcel.path for parcel in parcels],
            destination,
            self.calling_aet,
            timeout_s=self.timeout_s,
        )
        return [dicom_verdict(outcome) for outcome in outcomes]


def dicom_verdict(outcome: StoreOutcome) -> Verdict:
    code = outcome.status_text if outcome.status is not None else "no-status"
    if outcome.verdict is StoreVerdict.DELIVERED:
        return Verdict(Outcome.DELIVERED, outcome.reason, code)
    if outcome.verdict is StoreVerdict.REJECTED:
        return Verdict(Outcome.REJECTED, outcome.reason, code)
    return Verdict(Outcome.RETRY, outcome.reason, code)


class HL7Transport(Protocol):
    """hl7_out.mllp's seam: MLLPSender (real) or ScriptedSender."""

    def send(self, message: str, destination: HL7Destination) -> DeliveryOutcome: ...


class HL7OruSender:
    """The ORU file's text over MLLP (HL7 v2.5 Appendix C.4); the ACK judged per §2.9.2."""

    def __init__(self, transport: HL7Transport | None = None) -> None:
        self.transport: HL7Transport = transport or MLLPSender()

    def send(self, destination: DestinationConfig, parcels: Sequence[Parcel]) -> list[Verdict]:
        assert isinstance(destination, HL7Destination)
        return send_each(parcels, lambda parcel: self._send_one(destination, parcel))

    def _send_one(self, destination: HL7Destination, parcel: Parcel) -> Verdict:
        with parcel.path.open(encoding="utf-8", newline="") as handle:  # keep the CRs
            message = handle.read()
        try:
            control_id = message_control_id(message)
        except ValueError as exc:
            return Verdict(Outcome.REJECTED, f"payload is not an HL7 message: {exc}", "no-MSH-10")
        if control_id != parcel.item.message_id:
            reason = f"payload MSH-10 {control_id!r} is not the row's message_id"
            return Verdict(Outcome.REJECTED, reason, "MSH-10-mismatch")
        return hl7_verdict(self.transport.send(message, destination))


def hl7_verdict(outcome: DeliveryOutcome) -> Verdict:
    """AA/CA delivered; AR/CR rejected; AE/CE, bad or missing ACKs retried (HL7 v2.5 §2.9).

    With no ACK at all (connect refused, timeout, garbage) the receiver is taken as down.
    """
    code = outcome.ack.code.value if outcome.ack is not None else "no-ACK"
    if outcome.status is DeliveryStatus.DELIVERED:
        return Verdict(Outcome.DELIVERED, outcome.reason, code)
    if outcome.status is DeliveryStatus.REJECTED:
        return Verdict(Outcome.REJECTED, outcome.reason, code)
    return Verdict(Outcome.RETRY, outcome.reason, code, destination_down=outcome.ack is None)


class FileSender:
    """Places a row's files in the destination directory, durably (fsync, rename, fsync dir).

    A row with object_id set (or an .hl7 payload) is that one file. A JSON report row is the
    report's whole set, written in this order so that the JSON, last, marks it complete:
    the DICOM objects (copy_dicom), the ORU ``oru-<destination name>.hl7`` beside the JSON
    (write_hl7), then the JSON. Names are fixed by the report (delivered_file_name), so a
    re-send rewrites the same files; an identical file already there is left untouched.
    """

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db = db
        self.data_dir = data_dir

    def send(self, destination: DestinationConfig, parcels: Sequence[Parcel]) -> list[Verdict]:
        assert isinstance(destination, FileDestination)
        return send_each(parcels, lambda parcel: self._write(destination, parcel))

    def _write(self, destination: FileDestination, parcel: Parcel) -> Verdict:
        files = self.files_for(destination, parcel)
        missing = [source for source, _ in files if not source.is_file()]
        if missing:
            reason = f"payload file missing: {missing[0]}"
            return Verdict(Outcome.REJECTED, reason, "payload-missing")
        written = 0
        for source, name in files:
            target = destination.directory / name
            try:
                written += _place(source.read_bytes(), target)
            except OSError as exc:
                reason = f"cannot write {target}: {exc}"
                return Verdict(Outcome.RETRY, reason, type(exc).__name__, True)
        return Verdict(Outcome.DELIVERED, "", f"{written} of {len(files)} written")

    def files_for(self, destination: FileDestination, parcel: Parcel) -> list[tuple[Path, str]]:
        """(source file, name in the destination directory) pairs, the row's payload last."""
        item = parcel.item
        own = (parcel.path, delivered_file_name(item))
        if item.object_kind is not None or parcel.path.suffix.lower() == ".hl7":
            return [own]
        stem = report_file_stem(item)
        files: list[tuple[Path, str]] = []
        if destination.copy_dicom:
            for obj in report_object_files(self.db, item.report_id):
                name = object_file_name(stem, obj.kind, obj.sop_instance_uid, Path(obj.path))
                files.append((self.data_dir / obj.path, name))
        if destination.write_hl7:
            oru = parcel.path.parent / f"oru-{destination.name}.hl7"
            files.append((oru, f"{stem}_oru.hl7"))
        return [*files, own]


def _place(data: bytes, target: Path) -> int:
    """Write ``data`` at ``target`` unless it is there already; 1 when written."""
    if target.is_file() and target.read_bytes() == data:
        return 0
    write_durably(target, data)
    return 1


_LABEL_BY_SUFFIX = {".json": "report", ".hl7": "oru"}


def report_file_stem(item: ClaimedItem) -> str:
    return f"{uid_component(item.study_instance_uid)}_{item.report_id}"


def object_file_name(stem: str, kind: str, sop_instance_uid: str, payload: Path) -> str:
    return f"{stem}_{kind}_{uid_component(sop_instance_uid)}{payload.suffix or '.dcm'}"


def delivered_file_name(item: ClaimedItem) -> str:
    """``<study uid>_<report id>_report.json``, ``..._oru.hl7``, or for a DICOM object
    ``..._<object kind>_<SOP instance uid>.dcm``; any other payload keeps its own name."""
    stem = report_file_stem(item)
    payload = Path(item.payload_path)
    if item.object_kind is not None and item.sop_instance_uid is not None:
        return object_file_name(stem, item.object_kind, item.sop_instance_uid, payload)
    label = _LABEL_BY_SUFFIX.get(payload.suffix.lower())
    return f"{stem}_{label}{payload.suffix}" if label else f"{stem}_{payload.name}"


class HttpSender:
    """POSTs the JSON payload (RFC 9110) with an Idempotency-Key header = message_id.

    2xx delivered; 408 and 429 retried (after Retry-After when given); other 4xx rejected;
    anything else — 5xx, 3xx, no answer — retried with the destination taken as down.
    """

    def __init__(self, transport: httpx.BaseTransport | None = None) -> None:
        self.transport = transport

    def send(self, destination: DestinationConfig, parcels: Sequence[Parcel]) -> list[Verdict]:
        assert isinstance(destination, HttpDestination)
        with httpx.Client(
            timeout=destination.timeout_s, transport=self.transport, follow_redirects=False
        ) as client:
            return send_each(parcels, lambda parcel: self._post(client, destination, parcel))

    def _post(self, client: httpx.Client, destination: HttpDestination, parcel: Parcel) -> Verdict:
        headers = request_headers(destination, parcel.item.message_id)
        try:
            response = client.post(
                destination.url, content=parcel.path.read_bytes(), headers=headers
            )
        except httpx.HTTPError as exc:
            return Verdict(Outcome.RETRY, f"HTTP request failed: {exc}", type(exc).__name__, True)
        return http_verdict(response)


def request_headers(destination: HttpDestination, message_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **destination.headers}
    if destination.bearer_token:
        headers["Authorization"] = f"Bearer {destination.bearer_token}"
    headers["Idempotency-Key"] = message_id
    return headers


def http_verdict(response: httpx.Response) -> Verdict:
    status = response.status_code
    code = f"HTTP {status}"
    if 200 <= status < 300:
        return Verdict(Outcome.DELIVERED, "", code)
    reason = f"{code}: {response.text[:500]}".strip()
    if status in (408, 429):
        return Verdict(Outcome.RETRY, reason, code, True, retry_after_seconds(response))
    if 400 <= status < 500:
        return Verdict(Outcome.REJECTED, reason, code)
    return Verdict(Outcome.RETRY, reason, code, True, retry_after_seconds(response))


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max((parsedate_to_datetime(value) - utcnow()).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def default_senders(calling_aet: str, db: Database, data_dir: Path) -> dict[str, Sender]:
    return {
        "dicom": DicomSender(calling_aet),
        "hl7": HL7OruSender(),
        "file": FileSender(db, data_dir),
        "http": HttpSender(),
    }


# ---------------------------------------------------------------------------------------------
# Backoff and dead letters


def next_attempt_at(
    policy: RetryPolicy, item: ClaimedItem, now: datetime, retry_after_s: float | None = None
) -> datetime | None:
    """When to try again after a failed attempt, or None when the row is to be dead-lettered
    (``attempts`` reached max_attempts, or the row is max_age_s old)."""
    if item.attempts >= policy.max_attempts:
        return None
    if (now - item.created_at).total_seconds() >= policy.max_age_s:
        return None
    exponent = min(max(item.attempts - 1, 0), 60)
    delay = min(policy.initial_backoff_s * 2.0**exponent, policy.max_backoff_s)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, policy.max_backoff_s))
    return now + timedelta(seconds=delay)


def dead_reason(policy: RetryPolicy, item: ClaimedItem, reason: str) -> str:
    if item.attempts >= policy.max_attempts:
        return f"{reason} (gave up after {item.attempts} attempts)"
    return f"{reason} (gave up: older than {policy.max_age_s:g} s)"


# ---------------------------------------------------------------------------------------------
# The worker


class _Lane:
    """One destination's thread: claim, send, record; wait for the next poll or a wake()."""

    def __init__(self, worker: DeliveryWorker, destination: DestinationConfig, sender: Sender):
        self.worker = worker
        self.destination = destination
        self.sender = sender
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.last_success_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.destination.name

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"delivery-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        worker = self.worker
        while not worker.stopping.is_set():
            self.wake.clear()
            try:
                handled = self.serve_once()
            except Exception as exc:  # database trouble: keep the lane alive, try again later
                log.error("delivery to %s: %s", self.name, type(exc).__name__)
                log.debug("delivery lane error", exc_info=True)
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                handled = 0
            if handled < worker.batch_size:
                self.wake.wait(worker.poll_interval_s)

    def serve_once(self) -> int:
        """Send one batch of due rows; return how many rows were claimed."""
        worker = self.worker
        items = claim_due(
            worker.db,
            self.name,
            self.destination.kind,
            worker.owner,
            worker.batch_size,
            worker.lease_s,
        )
        if not items:
            return 0
        parcels = [Parcel(item, worker.data_dir / item.payload_path) for item in items]
        verdicts = self.sender.send(self.destination, parcels)
        if len(verdicts) != len(parcels):
            raise RuntimeError(f"{type(self.sender).__name__} returned a wrong number of verdicts")
        self._record(parcels, verdicts)
        return len(items)

    def _record(self, parcels: Sequence[Parcel], verdicts: Sequence[Verdict]) -> None:
        now = utcnow()
        sent: list[ClaimedItem] = []
        failures: list[Failure] = []
        for parcel, verdict in zip(parcels, verdicts, strict=True):
            self.worker.counters.add("attempts", self.name)
            if verdict.outcome is Outcome.DELIVERED:
                sent.append(parcel.item)
                self._log_delivered(parcel.item, verdict)
            else:
                failures.append(self._failure(parcel.item, verdict, now))
        finish(self.worker.db, sent, failures)
        self.worker.counters.add("delivered", self.name, len(sent))
        if sent:
            self.last_success_at = now
        failed = [verdict for verdict in verdicts if verdict.outcome is not Outcome.DELIVERED]
        self.last_error = f"{failed[-1].outcome}: {failed[-1].code}" if failed else None

    def _failure(self, item: ClaimedItem, verdict: Verdict, now: datetime) -> Failure:
        policy = self.destination.retry
        counters = self.worker.counters
        counters.add(str(verdict.outcome), self.name)
        retry_at = (
            next_attempt_at(policy, item, now, verdict.retry_after_s)
            if verdict.outcome is Outcome.RETRY
            else None
        )
        reason = verdict.reason or verdict.code
        if retry_at is None:
            if verdict.outcome is Outcome.RETRY:
                reason = dead_reason(policy, item, reason)
            counters.add("dead", self.name)
            log.warning(
                "outbox row %d (%s, message %s) to %s is dead after %d attempt(s): %s %s",
                item.id, item.kind, item.message_id, self.name, item.attempts,
                verdict.outcome, verdict.code,
            )  # fmt: skip
        else:
            log.info(
                "outbox row %d (%s, message %s) to %s: %s %s; attempt %d, next in %.1f s",
                item.id, item.kind, item.message_id, self.name, verdict.outcome, verdict.code,
                item.attempts, (retry_at - now).total_seconds(),
            )  # fmt: skip
        return Failure(item, reason, retry_at)

    def _log_delivered(self, item: ClaimedItem, verdict: Verdict) -> None:
        log.info(
            "outbox row %d (%s, message %s) delivered to %s (%s, attempt %d)",
            item.id, item.kind, item.message_id, self.name, verdict.code, item.attempts,
        )  # fmt: skip


class DeliveryWorker:
    """The delivery Part: one lane per enabled destination plus a watch on unserved rows.

    ``destinations``: NodeSettings.destinations; rows are matched by destination name and kind.
    ``release_leases_on_start``: take back every lease at start (default: on SQLite, where
    this is the only delivery worker); on PostgreSQL a dead worker's leases simply expire.
    ``lease_s`` must exceed the longest batch (timeouts x batch size when peers are slow).
    """

    def __init__(
        self,
        db: Database,
        data_dir: Path,
        destinations: Sequence[DestinationConfig],
        *,
        calling_aet: str = "MEDGEMMA",
        senders: Mapping[str, Sender] | None = None,
        poll_interval_s: float = 2.0,
        watch_interval_s: float = 30.0,
        batch_size: int = 16,
        lease_s: float = 300.0,
        release_leases_on_start: bool | None = None,
        owner: str | None = None,
        join_timeout_s: float = 120.0,
    ) -> None:
        self.db = db
        self.data_dir = Path(data_dir)
        self.destinations = {destination.name: destination for destination in destinations}
        self.senders = {**default_senders(calling_aet, db, self.data_dir), **(senders or {})}
        self.poll_interval_s = poll_interval_s
        self.watch_interval_s = watch_interval_s
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.release_leases_on_start = (
            db.is_sqlite if release_leases_on_start is None else release_leases_on_start
        )
        self.owner = owner or f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.join_timeout_s = join_timeout_s
        self.counters = DeliveryCounters()
        self.stopping = threading.Event()
        self.lanes = [
            _Lane(self, destination, self.senders[destination.kind])
            for destination in destinations
            if destination.enabled
        ]
        self.unserved: dict[tuple[str, str], str] = {}
        self._watch_thread: threading.Thread | None = None
        self._watch_error: str | None = None

    @classmethod
    def from_settings(
        cls, settings: NodeSettings, db: Database, **options: object
    ) -> DeliveryWorker:
        """The worker for a node: its data directory, destinations and AE title."""
        return cls(
            db,
            settings.storage.data_dir,
            list(settings.destinations),
            calling_aet=settings.dicom.ae_title,
            **options,  # type: ignore[arg-type]
        )

    # Part protocol ---------------------------------------------------------------------------

    def start(self) -> None:
        self.stopping.clear()
        if self.release_leases_on_start:
            released = release_leases(self.db)
            if released:
                log.info("took back %d outbox lease(s) left by the previous run", released)
        for lane in self.lanes:
            lane.start()
        self._watch_thread = threading.Thread(
            target=self._watch, name="delivery-watch", daemon=True
        )
        self._watch_thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for lane in self.lanes:
            lane.wake.set()
        threads = [lane.thread for lane in self.lanes] + [self._watch_thread]
        for thread in threads:
            if thread is not None:
                thread.join(self.join_timeout_s)
                if thread.is_alive():
                    log.warning("%s did not stop within %.0f s", thread.name, self.join_timeout_s)

    @property
    def last_error(self) -> str | None:
        """Destinations whose last attempt failed, and routes nobody serves; None when fine."""
        problems = [f"{lane.name}: {lane.last_error}" for lane in self.lanes if lane.last_error]
        problems += [f"{name} ({kind}): unserved" for name, kind in sorted(self.unserved)]
        if self._watch_error:
            problems.append(f"watch: {self._watch_error}")
        return "; ".join(problems) or None

    # Control ---------------------------------------------------------------------------------

    def wake(self, destination: str | None = None) -> None:
        """Look for due rows now (after writing outbox rows) instead of at the next poll."""
        for lane in self.lanes:
            if destination is None or lane.name == destination:
                lane.wake.set()

    def deliver_once(self) -> int:
        """Serve every destination in turn until nothing is due; return rows handled.

        For `outbox deliver --once` and tests; the running worker uses its lanes instead.
        """
        self.check_unserved()
        handled = 0
        for lane in self.lanes:
            while True:
                count = lane.serve_once()
                handled += count
                if count < self.batch_size:
                    break
        return handled

    def health(self) -> dict[str, dict[str, object]]:
        return {
            lane.name: {
                "kind": lane.destination.kind,
                "last_error": lane.last_error,
                "last_success_at": lane.last_success_at,
                "running": lane.thread is not None and lane.thread.is_alive(),
            }
            for lane in self.lanes
        }

    # Unserved rows ---------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self.stopping.is_set():
            try:
                self.check_unserved()
                self._watch_error = None
            except Exception as exc:
                log.error("delivery watch: %s", type(exc).__name__)
                self._watch_error = type(exc).__name__
            self.stopping.wait(self.watch_interval_s)

    def check_unserved(self) -> dict[tuple[str, str], str]:
        """Pending rows that no lane serves keep a note in last_error and one warning log."""
        found: dict[tuple[str, str], str] = {}
        for (destination, kind), count in sorted(pending_routes(self.db).items()):
            note = self._unserved_note(destination, kind)
            if note is None:
                continue
            note_on_pending(self.db, destination, kind, note)
            if (destination, kind) not in self.unserved:
                log.warning("%d pending outbox row(s) wait: %s", count, note)
            found[(destination, kind)] = note
        self.unserved = found
        return found

    def _unserved_note(self, destination: str, kind: str) -> str | None:
        config = self.destinations.get(destination)
        if config is None:
            return (
                f"destination {destination!r} is not configured; the rows stay pending until "
                "it is (or use `medgemma-node outbox` to inspect them)"
            )
        if not config.enabled:
            return f"destination {destination!r} is disabled (enabled = false)"
        if config.kind != kind:
            return f"rows of kind {kind!r} wait, but destination {destination!r} is {config.kind!r}"
        return None
