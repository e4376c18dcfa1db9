"""A real Orthanc PACS (Debian's /usr/sbin/Orthanc) for tests: unprivileged, loopback only.

    with OrthancServer(tmp_path / "orthanc") as pacs:     # or the `orthanc` fixture
        ...C-STORE to ("127.0.0.1", pacs.dicom_port), called AE pacs.aet...
        pacs.instance_ids(); pacs.instance_tags(id); pacs.study(id)
        pacs.stop(); ...outage...; pacs.start()            # same ports, same storage

Orthanc 1.10 accepts C-STORE from any calling AE ("DicomAlwaysAllowStore": true) and, with
"DicomCheckCalledAet": false, any called AE. The REST API listens on 127.0.0.1 only
("RemoteAccessAllowed": false) without authentication.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from peers.net import free_port

ORTHANC_BINARY = "/usr/sbin/Orthanc"
STARTUP_TIMEOUT_S = 30.0


class OrthancServer:
    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        *,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """``extra_config``: more Orthanc settings (DicomTls*, *TransferSyntaxAccepted...)."""
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.storage_dir = workdir / "storage"
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        self.extra_config = extra_config or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=10.0)

    def configuration(self) -> dict[str, Any]:
        return {
            "Name": "medgemma-test-pacs",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {},
            "StableAge": 1,
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            **self.extra_config,
        }

    def start(self) -> OrthancServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.configuration(), indent=2))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC_BINARY, str(self.config_path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self._http.get("/system").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc did not answer GET /system in {STARTUP_TIMEOUT_S} s")

    def stop(self, graceful: bool = True) -> None:
        """Stop by PID: SIGTERM and wait (SIGKILL after 20 s), or SIGKILL at once. The storage
        stays, so a later start() serves the same instances on the same ports."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.kill(self.proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        """Stop at once (a test is over: nothing to keep) and close the REST client."""
        self.stop(graceful=False)
        self._http.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # REST API ----------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = self._http.get(path)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> str:
        """Store a DICOM file through the REST API (POST /instances); its Orthanc id."""
        response = self._http.post("/instances", content=path.read_bytes())
        response.raise_for_status()
        return str(response.json()["ID"])

    @property
    def pid(self) -> int | None:
        """The Orthanc process this object started (to pause it in a test), if running."""
        return self.proc.pid if self.running and self.proc is not None else None

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/tags?simplify"))

    def study(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/studies/{orthanc_id}"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file, as Orthanc keeps it."""
        response = self._http.get(f"/instances/{orthanc_id}/file")
        response.raise_for_status()
        return response.content

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of everything stored (one entry per stored instance)."""
        return [self.instance_tags(i)["SOPInstanceUID"] for i in self.instance_ids()]

    def statistics(self) -> dict[str, Any]:
        return dict(self.get("/statistics"))

    def instance_metadata(self, orthanc_id: str, name: str) -> str:
        """One metadata value, e.g. "TransferSyntax" (the syntax Orthanc stored)."""
        response = self._http.get(f"/instances/{orthanc_id}/metadata/{name}")
        response.raise_for_status()
        return response.text
