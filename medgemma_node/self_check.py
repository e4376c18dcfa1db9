"""`medgemma-node self-check`: how this installation handles data, and whether it is safe.

Each finding is ``ok``, ``warn`` or ``unsafe``. Unsafe (the command exits 1): no calling AE
allowlist; the DICOM listener or the REST API on a non-loopback address without TLS; the API
enabled with no active user; the metrics endpoint on a non-loopback address (it has no
authentication). Warnings: results sent in clear to another machine, audit forwarding in clear
or off, retention off, a PHI salt not yet made.
"""

from __future__ import annotations

import ipaddress
import platform
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from config.settings import (
    DicomDestination,
    FileDestination,
    HL7Destination,
    HttpDestination,
    NodeSettings,
)
from core.version import node_version
from storage.db import Database
from storage.phi import SALT_FILE
from storage.users import list_users

OK, WARN, UNSAFE = "ok", "warn", "unsafe"
VERSIONED = ("pydicom", "pynetdicom", "sqlalchemy", "fastapi", "torch", "transformers")


@dataclass(frozen=True)
class Finding:
    level: str
    topic: str
    message: str


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_checks(settings: NodeSettings) -> dict[str, Any]:
    findings = [
        *dicom_findings(settings),
        *api_findings(settings),
        *metrics_findings(settings),
        *destination_findings(settings),
        *other_findings(settings),
    ]
    return {
        "findings": [asdict(finding) for finding in findings],
        "unsafe": sum(finding.level == UNSAFE for finding in findings),
        "data_flows": data_flows(settings),
        "versions": versions(),
    }


def dicom_findings(settings: NodeSettings) -> list[Finding]:
    dicom = settings.dicom
    where = f"{dicom.bind_address}:{dicom.port}"
    found = [
        Finding(OK, "dicom.tls", f"DICOM TLS on ({where})")
        if dicom.tls.enabled
        else Finding(
            OK if is_loopback(dicom.bind_address) else UNSAFE,
            "dicom.tls",
            f"DICOM listener {where} without TLS"
            + ("" if is_loopback(dicom.bind_address) else " on a non-loopback address"),
        )
    ]
    if dicom.allowed_calling_aets:
        allowed = ", ".join(dicom.allowed_calling_aets)
        found.append(Finding(OK, "dicom.allowed_calling_aets", f"AE allowlist: {allowed}"))
    else:
        found.append(
            Finding(UNSAFE, "dicom.allowed_calling_aets", "no AE allowlist: any AE may store")
        )
    return found


def api_findings(settings: NodeSettings) -> list[Finding]:
    api = settings.api
    if not api.enabled:
        return [Finding(OK, "api", "REST API off")]
    found = []
    if api.tls.enabled:
        found.append(Finding(OK, "api.tls", f"REST API HTTPS on {api.host}:{api.port}"))
    elif is_loopback(api.host):
        found.append(Finding(OK, "api.tls", f"REST API on loopback {api.host}:{api.port}"))
    else:
        found.append(Finding(UNSAFE, "api.tls", f"REST API on {api.host}:{api.port} without TLS"))
    found.append(_users_finding(settings))
    return found


def _users_finding(settings: NodeSettings) -> Finding:
    db = Database(settings.database_url)
    try:
        active = [u for u in list_users(db) if u.active] if db.is_current() else []
    except Exception as exc:
        return Finding(UNSAFE, "api.users", f"users cannot be read: {type(exc).__name__}")
    finally:
        db.dispose()
    if not active:
        return Finding(UNSAFE, "api.users", "no API users (`medgemma-node api add-user`)")
    roles = ", ".join(f"{u.name} ({u.role.value})" for u in active)
    return Finding(OK, "api.users", f"API users: {roles}")


def metrics_findings(settings: NodeSettings) -> list[Finding]:
    metrics = settings.metrics
    if not metrics.enabled:
        return [Finding(OK, "metrics", "metrics endpoint off")]
    where = f"{metrics.bind_address}:{metrics.port}"
    if is_loopback(metrics.bind_address):
        return [Finding(OK, "metrics", f"metrics on loopback {where}")]
    return [Finding(UNSAFE, "metrics", f"metrics on a public address {where} (no authentication)")]


def destination_findings(settings: NodeSettings) -> list[Finding]:
    found = []
    for destination in settings.destinations:
        if not destination.enabled:
            continue
        topic = f"destinations.{destination.name}"
        host, secure = _destination_transport(destination)
        if host is None:
            found.append(Finding(OK, topic, "local files"))
        elif secure:
            found.append(Finding(OK, topic, f"{destination.kind} to {host} over TLS"))
        else:
            level = OK if is_loopback(host) else WARN
            found.append(Finding(level, topic, f"{destination.kind} to {host} without TLS"))
    if settings.model.engine == "openai" and settings.model.openai.base_url:
        url = urlsplit(settings.model.openai.base_url)
        level = OK if url.scheme == "https" or is_loopback(url.hostname or "") else WARN
        found.append(Finding(level, "model.openai", f"images sent to {url.scheme}://{url.netloc}"))
    return found


def _destination_transport(destination: object) -> tuple[str | None, bool]:
    if isinstance(destination, DicomDestination | HL7Destination):
        return destination.host, destination.tls.enabled
    if isinstance(destination, HttpDestination):
        url = urlsplit(destination.url)
        return url.hostname or destination.url, url.scheme == "https"
    if isinstance(destination, FileDestination):
        return None, True
    return "unknown", False


def other_findings(settings: NodeSettings) -> list[Finding]:
    data_dir = settings.storage.data_dir
    salt = settings.storage.phi_hash_salt or (data_dir / SALT_FILE).exists()
    found = [
        Finding(OK, "storage.phi_hash_salt", "PHI hash salt set")
        if salt
        else Finding(WARN, "storage.phi_hash_salt", "no PHI salt yet (made at first start)")
    ]
    syslog = settings.audit.syslog
    if not syslog.enabled:
        found.append(Finding(WARN, "audit.syslog", "audit trail kept locally only"))
    else:
        level = OK if syslog.transport == "tls" or is_loopback(syslog.host) else WARN
        found.append(
            Finding(
                level, "audit.syslog", f"audit forwarded by {syslog.transport} to {syslog.host}"
            )
        )
    retention = settings.retention
    found.append(
        Finding(
            OK if retention.enabled else WARN,
            "retention",
            f"instances {retention.instances_days:g} days, outputs {retention.outputs_days:g} "
            f"days after delivery; free-space target {settings.free_space_target_mb} MB"
            if retention.enabled
            else "retention off: the disk fills until C-STORE is refused",
        )
    )
    return found


def data_flows(settings: NodeSettings) -> list[str]:
    dicom = settings.dicom
    senders = ", ".join(dicom.allowed_calling_aets) or "any AE"
    flows = [
        f"in: DICOM C-STORE from {senders} on {dicom.bind_address}:{dicom.port}"
        f" ({'TLS' if dicom.tls.enabled else 'no TLS'})",
        f"kept: instances and reports under {settings.storage.data_dir.resolve()}",
        f"model: {settings.model.engine}"
        + (f" at {settings.model.openai.base_url}" if settings.model.engine == "openai" else ""),
    ]
    for destination in settings.destinations:
        if destination.enabled:
            host, secure = _destination_transport(destination)
            target = getattr(destination, "directory", None) or host
            flows.append(
                f"out: {destination.name} ({destination.kind}) to {target}"
                + ("" if host is None else f" ({'TLS' if secure else 'no TLS'})")
            )
    if settings.api.enabled:
        flows.append(f"API: {settings.api.host}:{settings.api.port} (reports, images, questions)")
    return flows


def versions() -> dict[str, str]:
    found = {"medgemma-node": node_version(), "python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
