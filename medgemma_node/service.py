"""The serving process: wires the parts together and supervises them.

    serve   = SCP + completion scheduler + inference worker + delivery worker + REST API
    worker  = inference worker only (a second GPU box on the same PostgreSQL)
    receive = one more SCP on serve's port, supervised by serve ([dicom] receive_processes)

Every part runs in its own thread; the model never runs in the SCP's association threads.
The delivery worker gets its senders from ``sender_registry``: the one place that names the
sender of each destination kind (the stages that hold them do not import one another).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from config.ops_settings import settings_fingerprint
from config.settings import (
    DicomDestination,
    FileDestination,
    HL7Destination,
    HttpDestination,
    NodeSettings,
)
from core.loop import LoopThread
from core.version import node_version
from delivery.file_sender import FileSender
from delivery.http_sender import HttpSender
from delivery.preparing_sender import PreparingSender
from delivery.senders import SenderRegistry
from delivery.worker import DeliveryWorker
from dicom_node.completion import CompletionScheduler
from dicom_node.listener import receive_processes
from dicom_node.mpps import MPPS_SOP_CLASS, MppsService
from dicom_node.scp import StorageSCP
from dicom_node.scp_counters import ScpCounters, sum_counters
from dicom_node.sender import DicomSender
from hl7_out.sender import HL7OruSender
from medgemma_node.audit_forwarder import AuditForwarder
from medgemma_node.logs import child_log_env, setup_logging
from medgemma_node.metrics import MetricSources, start_metrics_server
from medgemma_node.pidfile import remove_pid_file
from medgemma_node.retention_part import Pruner, RetentionLoop
from medgemma_node.runtime import (
    STATUS_FILE,
    clear_receiver_states,
    receiver_counters,
    receiver_status_file,
)
from medgemma_node.supervisor import ChildProcess
from storage import audit
from storage.db import Database
from storage.delivery_types import Sender
from storage.doorbell import (
    COMPLETION_DOORBELL,
    DELIVERY_DOORBELL,
    WORKER_DOORBELL,
    Doorbell,
    ring,
)
from storage.installation import ensure_installation_id
from storage.phi import load_or_create_salt
from storage.recovery import recover

if TYPE_CHECKING:
    from inference.loader import EngineProvider
    from inference.worker import InferenceWorker
    from medgemma_node.report_pdf import ReportPdfFiles

log = logging.getLogger(__name__)


class Part(Protocol):
    """A supervised component: start() returns at once, stop() returns when it has stopped."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class RuntimeState:
    """What `status` shows about the running process (written to <data>/run/status.json)."""

    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    scp: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    api: dict[str, Any] = field(default_factory=dict)
    priors: dict[str, Any] = field(default_factory=dict)  # [priors]: searches, last error


def open_database(settings: NodeSettings) -> Database:
    db = Database(settings.database_url)
    if not db.is_current():
        log.info("upgrading the database schema")
        db.upgrade()
    return db


class Node:
    """One serving process."""

    def __init__(
        self, settings: NodeSettings, *, with_scp: bool = True, receiver: int | None = None
    ) -> None:
        self.settings = settings
        self.data_dir = settings.storage.data_dir
        self.with_scp = with_scp
        self.receiver = receiver  # `receive`: this process's index among the receivers
        self.status_file = (
            receiver_status_file(receiver)
            if receiver is not None
            else STATUS_FILE
            if with_scp
            else Path("run") / f"worker-{socket.gethostname()}-{os.getpid()}.json"
        )
        self.stop_event = threading.Event()
        self.state = RuntimeState()
        self.parts: dict[str, Part] = {}
        self.state_providers: list[Callable[[RuntimeState], None]] = []
        self.db: Database | None = None
        self.scp: StorageSCP | None = None
        self.metrics_server: Any = None
        self.pid_file: Path | None = None  # `serve` only (medgemma_node/pidfile.py)

    def prepare(self) -> Database:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(
            self.settings.logging.level,
            self.settings.logging.file or self.data_dir / "logs" / "node.log",
        )
        self.db = open_database(self.settings)
        return self.db

    def start(self) -> None:
        db = self.db or self.prepare()
        salt = load_or_create_salt(self.data_dir, self.settings.storage.phi_hash_salt)
        self._check_identity(db)
        self._audit("node.start", config_fingerprint=settings_fingerprint(self.settings))
        data_dir = self.data_dir
        if self.receiver is not None:
            # serve has recovered the data directory and runs the completion scheduler; a
            # completed MPPS step here wakes it through its doorbell.
            make_room = (
                Pruner(self.settings, db).make_room if self.settings.retention.enabled else None
            )
            self._start_scp(db, salt, lambda: ring(data_dir, COMPLETION_DOORBELL), make_room)
        elif self.with_scp:
            report = recover(db, self.data_dir, salt, self.settings.model.lease_seconds)
            log.info("start-up check: %s", report)
            scheduler = CompletionScheduler(
                db,
                self.settings.completion,
                on_jobs=lambda _ids: ring(data_dir, WORKER_DOORBELL),
                use_mpps=self.settings.dicom.mpps,
            )
            self._start_scp(db, salt, scheduler.wake)
            self.add_part("completion", scheduler)
        self.write_state()

    def _start_scp(
        self,
        db: Database,
        salt: bytes,
        on_mpps_completed: Callable[[], None],
        make_room: Callable[[], int] | None = None,
    ) -> None:
        scp = self.scp = StorageSCP(self.settings, db, salt)
        scp.make_room = make_room  # serve sets its own once its retention part exists
        if self.settings.model.early_start:
            # An idle worker runs studies during their quiet period (inference/early_start.py):
            # it hears of each one as its instances arrive, not at its next poll.
            data_dir = self.data_dir
            scp.on_instance_stored.append(lambda _item: ring(data_dir, WORKER_DOORBELL))
        if self.settings.dicom.mpps:
            self._add_mpps(scp, on_mpps_completed)
        scp.start()
        self.state.scp = {
            "ae_title": self.settings.dicom.ae_title,
            "address": self.settings.dicom.bind_address,
            "port": scp.port,
        }
        self.state_providers.append(
            lambda state: state.scp.update(counters=scp.counters.snapshot())
        )

    def _check_identity(self, db: Database) -> None:
        """Create the installation id with the data directory (storage/installation.py)."""
        with db.session() as session:
            installation_id = ensure_installation_id(session, self.data_dir)
        log.info("installation id %s", installation_id)
        if self.settings.identity.uid_root is None:
            log.warning(
                "no [identity] uid_root configured: minting 2.25 UUID-derived UIDs (PS3.5 B.2); "
                "set your organisation's UID root to have UIDs under it"
            )

    @staticmethod
    def _add_mpps(scp: StorageSCP, on_completed: Callable[[], None]) -> None:
        """The MPPS SCP on the same AE; a completed step wakes the completion scheduler."""
        mpps = MppsService(scp.db, scp.association_audit, on_completed=on_completed)
        mpps.load()
        scp.extra_services.append((MPPS_SOP_CLASS, mpps.handlers()))
        scp.on_instance_stored.append(lambda item: mpps.instance_stored(item.study_uid))

    @property
    def role(self) -> str:
        if self.receiver is not None:
            return "receive"
        return "serve" if self.with_scp else "worker"

    def _audit(self, kind: str, **detail: object) -> None:
        """node.start / node.stop: which process, its version and pid (storage/audit.py)."""
        if self.db is None:
            return
        try:
            audit.record(
                self.db,
                kind,
                actor=self.role,
                address=self.state.host,
                version=node_version(),
                pid=self.state.pid,
                **detail,
            )
        except Exception as exc:  # never keeps the node from starting or stopping
            log.error("audit row %s not written (%s)", kind, type(exc).__name__)

    def scp_counters(self) -> ScpCounters | None:
        """This process's counts; in serve, with those the other receivers last wrote."""
        if self.scp is None:
            return None
        if self.receiver is not None:
            return self.scp.counters
        return sum_counters([self.scp.counters.snapshot(), *receiver_counters(self.data_dir)])

    def add_part(self, name: str, part: Part) -> None:
        self.parts[name] = part
        part.start()
        log.info("%s started", name)

    def write_state(self) -> None:
        for provider in self.state_providers:
            provider(self.state)
        for name, part in self.parts.items():
            self.state.parts[name] = {"last_error": getattr(part, "last_error", None)}
        path = self.data_dir / self.status_file
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.state.__dict__, default=str, indent=2))
        os.replace(temp, path)

    def catch_signals(self) -> None:
        """SIGTERM and SIGINT stop the node in order from now on; caught before its parts
        start, so a signal during start-up (``stop`` right after ``serve``) stops it once
        started instead of killing it halfway."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def run_until_signal(self) -> None:
        self.catch_signals()
        while not self.stop_event.wait(2.0):
            self.write_state()
        self.stop()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d received: stopping", signum)
        self.stop_event.set()

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        for name, part in reversed(list(self.parts.items())):
            part.stop()
            log.info("%s stopped", name)
        (self.data_dir / self.status_file).unlink(missing_ok=True)
        self._audit("node.stop")
        if self.db is not None:
            self.db.dispose()
        if self.pid_file is not None:
            remove_pid_file(self.pid_file)
        log.info("stopped")


class DoorbellRelay:
    """Turns rings of a doorbell (storage.doorbell) into calls, e.g. DeliveryWorker.wake()."""

    def __init__(self, data_dir: Path, name: str, action: Callable[[], None]) -> None:
        self.data_dir = data_dir
        self.name = name
        self.action = action
        self.doorbell: Doorbell | None = None
        # The step itself blocks on the doorbell (up to 1 s); stop() rings it to end the wait.
        self.loop = LoopThread(
            f"doorbell-{name}",
            self._answer,
            interval_s=0.0,
            error_wait_s=1.0,
            interrupt=lambda: ring(data_dir, name),
            log=log,
        )

    @property
    def last_error(self) -> str | None:
        return self.loop.last_error

    def start(self) -> None:
        self.doorbell = Doorbell(self.data_dir, self.name)
        self.loop.start()

    def _answer(self) -> float:
        assert self.doorbell is not None
        if self.doorbell.wait(1.0) and not self.loop.stopping:
            self.action()
        return 0.0

    def stop(self) -> None:
        self.loop.stop(timeout_s=5)
        if self.doorbell is not None:
            self.doorbell.close()


def child_argv(command: str, config_path: Path | None, data_dir: Path, *options: str) -> list[str]:
    """The command line of a child process that `serve` supervises (worker, receive)."""
    argv = [sys.executable, "-m", "medgemma_node.cli", command, "--data-dir", str(data_dir)]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return [*argv, *options]


def sender_registry(
    db: Database, data_dir: Path, calling_aet: str, pdfs: ReportPdfFiles | None = None
) -> SenderRegistry:
    """The sender of each destination kind; a new kind is registered here.

    ``pdfs``: when destinations want PDF reports, the senders that may meet a PDF not built
    yet (DICOM with send_pdf; file with write_pdf, or copy_dicom of an Encapsulated PDF) build
    it first (delivery.preparing_sender, medgemma_node.report_pdf).
    """

    def dicom(destination: DicomDestination) -> Sender:
        sender = DicomSender(destination, calling_aet)
        if pdfs is None or not destination.send_pdf:
            return sender
        return PreparingSender(sender, pdfs.prepare_dicom)

    def files(destination: FileDestination) -> Sender:
        sender = FileSender(destination, db, data_dir)
        if pdfs is None or not (destination.write_pdf or destination.copy_dicom):
            return sender
        return PreparingSender(sender, pdfs.file_preparer(destination))

    return (
        SenderRegistry()
        .register(DicomDestination, dicom)
        .register(HL7Destination, HL7OruSender)
        .register(FileDestination, files)
        .register(HttpDestination, HttpSender)
    )


class SharedReportPdfs:
    """The serving process' one ReportPdfFiles, made on first use: the delivery lanes and the
    REST API (``?format=pdf``) build each report's PDF once, under one lock. WeasyPrint and
    the PDF builders load only when a PDF is first wanted."""

    def __init__(self, settings: NodeSettings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._files: ReportPdfFiles | None = None
        self._lock = threading.Lock()

    @property
    def files(self) -> ReportPdfFiles:
        with self._lock:
            if self._files is None:
                from medgemma_node.report_pdf import ReportPdfFiles

                self._files = ReportPdfFiles(self.settings, self.db)
            return self._files

    def ensure_pdf(self, report_id: int) -> bytes:
        return self.files.ensure_pdf(report_id)


def delivery_worker(
    settings: NodeSettings,
    db: Database,
    pdfs: SharedReportPdfs | None = None,
    **options: object,
) -> DeliveryWorker:
    """The node's delivery worker: every destination's lane with its sender."""
    files = None
    if any(d.enabled and d.wants_pdf for d in settings.destinations):
        files = (pdfs or SharedReportPdfs(settings, db)).files
    senders = sender_registry(db, settings.storage.data_dir, settings.dicom.ae_title, files)
    return DeliveryWorker.from_settings(settings, db, senders, **options)


def start_serving(node: Node, config_path: Path | None) -> None:
    """`serve`: SCP, completion and delivery in this process; inference as a supervised child."""
    node.start()
    db = node.db
    assert db is not None
    data_dir = node.data_dir.resolve()
    node.add_part(
        "inference",
        ChildProcess(
            "inference worker", child_argv("worker", config_path, data_dir), child_log_env()
        ),
    )
    start_receivers(node, config_path)
    pdfs = SharedReportPdfs(node.settings, db)
    deliveries = delivery_worker(node.settings, db, pdfs)
    node.add_part("delivery", deliveries)
    node.add_part(
        "delivery-doorbell", DoorbellRelay(node.data_dir, DELIVERY_DOORBELL, deliveries.wake)
    )
    if node.settings.api.enabled:
        from api.server import ApiServer  # FastAPI loads only when the API is served
        from medgemma_node.outputs import ReportOutputs

        # Appending a conversation writes a report version (SR, ORU, outbox) in this process.
        api = ApiServer(
            node.settings, db, on_report=ReportOutputs(node.settings), report_pdf=pdfs.ensure_pdf
        )
        node.state_providers.append(lambda state: state.api.update(api.state))
        node.add_part("api", api)
    if node.settings.retention.enabled:
        pruner = Pruner(node.settings, db)
        if node.scp is not None:
            node.scp.make_room = pruner.make_room
        node.add_part("retention", RetentionLoop(pruner, node.settings.retention.check_interval_s))
    if node.settings.audit.syslog.enabled:
        syslog = node.settings.audit.syslog
        node.add_part("audit-forwarder", AuditForwarder(db, syslog, node.data_dir))
    metrics = node.settings.metrics
    if metrics.enabled:
        node.metrics_server = start_metrics_server(
            metrics.bind_address,
            metrics.port,
            MetricSources(db, node.data_dir, node.scp_counters, deliveries.counters),
        )


def start_receivers(node: Node, config_path: Path | None) -> None:
    """The other processes receiving on serve's port ([dicom] receive_processes), each a
    supervised child; their completed MPPS steps ring the completion scheduler."""
    data_dir = node.data_dir.resolve()
    clear_receiver_states(data_dir)  # a receiver of an earlier run that was killed
    count = receive_processes(node.settings.dicom)
    scheduler = node.parts.get("completion")
    if count > 1 and isinstance(scheduler, CompletionScheduler):
        node.add_part(
            "completion-doorbell", DoorbellRelay(node.data_dir, COMPLETION_DOORBELL, scheduler.wake)
        )
    port = node.scp.port if node.scp is not None else node.settings.dicom.port
    for index in range(1, count):
        argv = child_argv(
            "receive", config_path, data_dir, "--index", str(index), "--port", str(port)
        )
        node.add_part(
            f"receiver-{index}", ChildProcess(f"DICOM receiver {index}", argv, child_log_env())
        )


def start_worker(node: Node) -> None:
    """`worker`: the inference worker alone, with the model loaded in this process."""
    # The model stack (torch, transformers) loads here, not at import: `serve`, `status`,
    # `echo` and the other commands start in a second instead of several.
    from inference.loader import EngineProvider
    from inference.worker import InferenceWorker
    from medgemma_node.outputs import ReportOutputs, start_store_process

    db = node.db or node.prepare()
    provider = EngineProvider(node.settings)
    finder = None
    if node.settings.priors.enabled:
        from dicom_node.priors import PacsPriorFinder

        finder = PacsPriorFinder(node.settings, db)
        node.state_providers.append(lambda state: state.priors.update(finder.state))
    render, output = node.settings.model.processes()
    logging_settings = node.settings.logging
    worker = InferenceWorker(
        db,
        node.settings,
        provider,
        ReportOutputs(node.settings),
        prior_finder=finder,
        render_processes=render,
        store_processes=output,
        # Each process logs as this one does (level, file, PHI filter).
        process_setup=partial(
            start_store_process,
            logging_settings.level,
            logging_settings.file or node.data_dir / "logs" / "node.log",
        ),
    )
    # Before start(): the first status file already says what the model is doing.
    node.state_providers.append(lambda state: _model_state(state, provider, worker))
    node.start()
    node.add_part("inference", worker)


def _model_state(state: RuntimeState, provider: EngineProvider, worker: InferenceWorker) -> None:
    state.model = dict(provider.state)
    stats = worker.stats
    state.model["worker"] = {
        "batches": stats.batches,
        "jobs_done": stats.jobs_done,
        "jobs_failed": stats.jobs_failed,
        "last_batch_size": stats.last_batch_size,
        "last_batch_seconds": round(stats.last_batch_seconds, 3),
        "inference_seconds_total": round(stats.inference_seconds_total, 3),
        "processes_ready": worker.pools_ready,  # its render and store processes have started
        "early_start": dict(worker.early.counts),  # studies run in their quiet period
        "last_error": worker.last_error,
    }
