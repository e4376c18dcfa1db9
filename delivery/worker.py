"""The delivery worker: sends outbox rows to their destinations, backs off, dead-letters.

    worker = DeliveryWorker.from_settings(settings, db, senders)   # senders: SenderRegistry
    node.add_part("delivery", worker)     # start(); stop() at shutdown
    worker.wake()                         # optional: rows were just written, look now

One lane — a thread (core.loop.LoopThread) — per enabled destination, so a destination that
times out only ever delays its own rows (one bad destination never blocks the others). A lane
claims the destination's due rows (storage.outbox: lease, attempt counted), hands them to the
sender built for that destination (delivery.senders) and records each outcome
(storage.delivery_types):

    DELIVERED  -> SENT, sent_at
    RETRY      -> pending again when the destination's retry policy (core.retry.RetryPolicy
                  from [destinations.retry]) says: initial_backoff_s * 2**(attempts-1) capped
                  at max_backoff_s, at least the peer's Retry-After; or DEAD once it gives up
                  (max_attempts reached, or the row is max_age_s old)
    REJECTED   -> DEAD at once; last_error keeps the reason

Nothing is built at send time: each row's payload file was written with the report, so a
crash between sending and marking SENT re-sends the very same bytes (same SR SOP Instance UID,
same HL7 MSH-10, same Idempotency-Key).

Outbox rows, as the senders read them (``kind`` is the destination's kind):
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
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from config.settings import Destination, NodeSettings
from core.errors import DeliveryError
from core.loop import LoopThread
from delivery.metrics import DeliveryCounters
from delivery.senders import SenderRegistry
from storage.db import Database
from storage.delivery_types import DeliveryOutcome, Parcel, Sender, Verdict
from storage.models import utcnow
from storage.outbox import (
    ClaimedItem,
    Failure,
    claim_due,
    finish,
    note_on_pending,
    pending_routes,
    release_leases,
)

log = logging.getLogger(__name__)


class _Lane:
    """One destination's loop (core.loop.LoopThread): claim, send, record; wait for the next
    poll or a wake(). A full batch means more may be due, so the next one is claimed at once."""

    def __init__(self, worker: DeliveryWorker, destination: Destination, sender: Sender):
        self.worker = worker
        self.destination = destination
        self.sender = sender
        self.policy = destination.retry.policy()
        self.loop: LoopThread | None = None
        # The outcome of the last batch sent (a peer's refusal), kept apart from the loop's
        # own failures (database trouble), which LoopThread records and clears on recovery.
        self.verdict_error: str | None = None
        self.last_success_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.destination.name

    @property
    def last_error(self) -> str | None:
        loop_error = self.loop.last_error if self.loop is not None else None
        return loop_error or self.verdict_error

    def is_alive(self) -> bool:
        return self.loop is not None and self.loop.is_alive()

    def start(self) -> None:
        batch_size = self.worker.batch_size
        # Peers' words may appear in a failure, so the log gets only its type (LoopThread).
        self.loop = LoopThread(
            f"delivery-{self.name}",
            lambda: 0.0 if self.serve_once() >= batch_size else None,
            interval_s=self.worker.poll_interval_s,
            traceback_in_log=False,
            log=log,
        )
        self.loop.start()

    def wake(self) -> None:
        if self.loop is not None:
            self.loop.wake()

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
        outcomes = self.sender.send(parcels)
        if len(outcomes) != len(parcels):
            raise DeliveryError(
                f"{type(self.sender).__name__} answered {len(outcomes)} outcomes "
                f"for {len(parcels)} rows"
            )
        self._record(parcels, outcomes)
        return len(items)

    def _record(self, parcels: Sequence[Parcel], outcomes: Sequence[DeliveryOutcome]) -> None:
        now = utcnow()
        sent: list[ClaimedItem] = []
        failures: list[Failure] = []
        for parcel, outcome in zip(parcels, outcomes, strict=True):
            self.worker.counters.add("attempts", self.name)
            if outcome.verdict is Verdict.DELIVERED:
                sent.append(parcel.item)
                self._log_delivered(parcel.item, outcome)
            else:
                failures.append(self._failure(parcel.item, outcome, now))
        finish(self.worker.db, sent, failures)
        self.worker.counters.add("delivered", self.name, len(sent))
        if sent:
            self.last_success_at = now
        failed = [outcome for outcome in outcomes if outcome.verdict is not Verdict.DELIVERED]
        self.verdict_error = f"{failed[-1].verdict}: {failed[-1].code}" if failed else None

    def _failure(self, item: ClaimedItem, outcome: DeliveryOutcome, now: datetime) -> Failure:
        counters = self.worker.counters
        counters.add(str(outcome.verdict), self.name)
        retry_at = (
            self.policy.next_attempt(item.attempts, item.created_at, now, outcome.retry_after_s)
            if outcome.verdict is Verdict.RETRY
            else None
        )
        reason = outcome.reason or outcome.code
        if retry_at is None:
            if outcome.verdict is Verdict.RETRY:
                reason = f"{reason} ({self.policy.give_up_reason(item.attempts)})"
            counters.add("dead", self.name)
            log.warning(
                "outbox row %d (%s, message %s) to %s is dead after %d attempt(s): %s %s",
                item.id, item.kind, item.message_id, self.name, item.attempts,
                outcome.verdict, outcome.code,
            )  # fmt: skip
        else:
            log.info(
                "outbox row %d (%s, message %s) to %s: %s %s; attempt %d, next in %.1f s",
                item.id, item.kind, item.message_id, self.name, outcome.verdict, outcome.code,
                item.attempts, (retry_at - now).total_seconds(),
            )  # fmt: skip
        return Failure(item, reason, retry_at)

    def _log_delivered(self, item: ClaimedItem, outcome: DeliveryOutcome) -> None:
        log.info(
            "outbox row %d (%s, message %s) delivered to %s (%s, attempt %d)",
            item.id, item.kind, item.message_id, self.name, outcome.code, item.attempts,
        )  # fmt: skip


class DeliveryWorker:
    """The delivery Part: one lane per enabled destination plus a watch on unserved rows.

    ``destinations``: NodeSettings.destinations; rows are matched by destination name and kind.
    ``senders``: builds each enabled destination's sender (DeliveryError for a kind it lacks).
    ``release_leases_on_start``: take back every lease at start (default: on SQLite, where
    this is the only delivery worker); on PostgreSQL a dead worker's leases simply expire.
    ``lease_s`` must exceed the longest batch (timeouts x batch size when peers are slow).
    """

    def __init__(
        self,
        db: Database,
        data_dir: Path,
        destinations: Sequence[Destination],
        senders: SenderRegistry,
        *,
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
        self.lanes = [
            _Lane(self, destination, senders.build(destination))
            for destination in destinations
            if destination.enabled
        ]
        self.unserved: dict[tuple[str, str], str] = {}
        self._watch: LoopThread | None = None

    @classmethod
    def from_settings(
        cls, settings: NodeSettings, db: Database, senders: SenderRegistry, **options: object
    ) -> DeliveryWorker:
        """The worker for a node: its data directory, destinations and [delivery] settings;
        ``options`` override the keyword arguments of the constructor."""
        delivery = settings.delivery
        defaults: dict[str, object] = {
            "poll_interval_s": delivery.poll_interval_s,
            "batch_size": delivery.batch_size,
            "lease_s": delivery.lease_s,
        }
        return cls(
            db,
            settings.storage.data_dir,
            list(settings.destinations),
            senders,
            **{**defaults, **options},  # type: ignore[arg-type]
        )

    # Part protocol ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.release_leases_on_start:
            released = release_leases(self.db)
            if released:
                log.info("took back %d outbox lease(s) left by the previous run", released)
        for lane in self.lanes:
            lane.start()
        self._watch = LoopThread(
            "delivery-watch",
            self._check_unserved_step,
            interval_s=self.watch_interval_s,
            traceback_in_log=False,
            log=log,
        )
        self._watch.start()

    def stop(self) -> None:
        loops = [lane.loop for lane in self.lanes] + [self._watch]
        running = [loop for loop in loops if loop is not None]
        for loop in running:  # every lane is asked first, so slow peers end their batches together
            loop.request_stop()
        for loop in running:
            loop.join(self.join_timeout_s)

    @property
    def last_error(self) -> str | None:
        """Destinations whose last attempt failed, and routes nobody serves; None when fine."""
        problems = [f"{lane.name}: {lane.last_error}" for lane in self.lanes if lane.last_error]
        problems += [f"{name} ({kind}): unserved" for name, kind in sorted(self.unserved)]
        watch_error = self._watch.last_error if self._watch is not None else None
        if watch_error:
            problems.append(f"watch: {watch_error}")
        return "; ".join(problems) or None

    # Control ---------------------------------------------------------------------------------

    def wake(self, destination: str | None = None) -> None:
        """Look for due rows now (after writing outbox rows) instead of at the next poll."""
        for lane in self.lanes:
            if destination is None or lane.name == destination:
                lane.wake()

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
                "running": lane.is_alive(),
            }
            for lane in self.lanes
        }

    # Unserved rows ---------------------------------------------------------------------------

    def _check_unserved_step(self) -> None:
        self.check_unserved()

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
