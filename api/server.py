"""The REST API as a supervised part of `serve`: uvicorn in its own thread.

``start()`` binds the listening socket itself, so a port in use or a bad certificate is an
error at start-up (`serve` refuses to start, as it does for the DICOM port) rather than a
thread that dies quietly. If uvicorn later stops on its own, the thread records
``last_error`` (shown by `status`) and serves again after a pause. TLS goes through
config/tls.py, the one place SSL contexts are built.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from api.app import create_app
from api.deps import ReportPdfSource
from config.settings import NodeSettings
from config.tls import server_ssl_context
from storage.conversations import ReportHook
from storage.db import Database

log = logging.getLogger("api.server")

RESTART_PAUSE_S = 2.0
GRACEFUL_SHUTDOWN_S = 3


class ApiServer:
    """A Part (medgemma_node.service): start() returns at once, stop() when stopped."""

    def __init__(
        self,
        settings: NodeSettings,
        db: Database,
        on_report: ReportHook | None = None,
        report_pdf: ReportPdfSource | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.app = create_app(settings, db, on_report, report_pdf)
        self.answers = self.app.state.context.answers  # its doorbell listener stops with us
        self.last_error: str | None = None
        self.restarts = 0
        self.port: int = settings.api.port
        self._stop = threading.Event()
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        # A seam for tests of the supervision: one uvicorn run on a bound socket.
        self.serve_once: Callable[[uvicorn.Server, socket.socket], None] = _run_uvicorn

    @property
    def scheme(self) -> str:
        return "https" if self.settings.api.tls.enabled else "http"

    @property
    def state(self) -> dict[str, Any]:
        return {
            "url": f"{self.scheme}://{self.settings.api.host}:{self.port}/api",
            "restarts": self.restarts,
        }

    def start(self) -> None:
        self._socket = self._bind(self.settings.api.port)
        self.port = int(self._socket.getsockname()[1])
        self._config()  # a bad certificate or key fails here, before the thread starts
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()
        log.info("REST API on %s (docs at /api/docs)", self.state["url"])

    def _bind(self, port: int) -> socket.socket:
        host = self.settings.api.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"REST API cannot listen on {host}:{port} ({exc.strerror})") from exc
        sock.listen(128)
        sock.set_inheritable(False)
        return sock

    def _config(self) -> uvicorn.Config:
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the node's logging (medgemma_node/logs.py) handles uvicorn's
            access_log=False,  # the audit trail records accesses; URLs may carry search text
            server_header=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        config.load()
        config.ssl = server_ssl_context(self.settings.api.tls)
        return config

    def _run(self) -> None:
        while not self._stop.is_set():
            reason = self._serve()
            if self._stop.is_set():
                break
            self.last_error = reason
            self.restarts += 1
            log.error("REST API stopped unexpectedly (%s); serving again", reason)
            self._stop.wait(RESTART_PAUSE_S)

    def _serve(self) -> str:
        """One uvicorn run; returns why it ended."""
        try:
            sock = self._socket or self._bind(self.port)
        except OSError as exc:
            return str(exc)
        self._socket = None
        try:
            self._server = uvicorn.Server(self._config())
            if self._stop.is_set():  # stop() came before this server existed
                return "stopped"
            self.serve_once(self._server, sock)
            return "uvicorn stopped"
        except BaseException as exc:  # SystemExit from uvicorn too: keep the node up
            return f"{type(exc).__name__}: {exc}"
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=GRACEFUL_SHUTDOWN_S + 5)
        if self._socket is not None:
            self._socket.close()
        self.answers.stop()


def _run_uvicorn(server: uvicorn.Server, sock: socket.socket) -> None:
    server.run(sockets=[sock])
