"""`medgemma-node status`: every part of the node, read from where it lives.

SCP          C-ECHO to the node itself on its configured/actual port
processes    <data>/run/*.json written by `serve` and each inference worker
model        loaded (id, device, test model or not) or why not (missing weights)
priors       [priors]: the PACS, studies compared, the last prior-query error
database     studies, instances, jobs by status, outbox by destination and status with the
             newest error of each destination
disk         free space against the C-STORE watermark
receiving    studies still in their quiet period: instances, seconds left
retention    what pruning would delete now (by age, or for space), and the free-space target
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from config.settings import NodeSettings
from dicom_node.scu import AssociationFailed, echo
from medgemma_node.retention_part import Pruner
from medgemma_node.runtime import read_runtime_state, read_worker_states
from storage.db import Database
from storage.files import free_disk_mb
from storage.installation import ensure_installation_id
from storage.models import Instance, Job, OutboxItem, OutboxStatus, Study, utcnow

STATUS_CALLING_AE = "MEDGEMMA_STATUS"


def collect_status(settings: NodeSettings) -> dict[str, Any]:
    data_dir = settings.storage.data_dir
    runtime = read_runtime_state(data_dir)
    return {
        "scp": scp_status(settings, runtime),
        "process": runtime,
        "workers": read_worker_states(data_dir),
        "database": database_status(settings),
        "disk_free_mb": round(free_disk_mb(data_dir), 1),
        "disk_watermark_mb": settings.storage.min_free_disk_mb,
        "retention": retention_status(settings),
    }


def retention_status(settings: NodeSettings) -> dict[str, Any]:
    """What `prune` would delete now (never deletes anything itself)."""
    try:
        db = Database(settings.database_url)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        actions = Pruner(settings, db).plan() if db.is_current() else []
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        db.dispose()
    return {
        "enabled": settings.retention.enabled,
        "free_space_target_mb": settings.free_space_target_mb,
        "prunable_studies": len(actions),
        "prunable_mb": round(sum(a.bytes for a in actions) / (1024 * 1024), 1),
        "prunable": [a.as_dict() for a in actions[:20]],
    }


def scp_status(settings: NodeSettings, runtime: dict[str, Any] | None) -> dict[str, Any]:
    dicom = settings.dicom
    port = (runtime or {}).get("scp", {}).get("port", dicom.port)
    host = "127.0.0.1" if dicom.bind_address in ("0.0.0.0", "::") else dicom.bind_address
    # A node restricted to some calling AEs would reject an unknown one: use the first allowed.
    calling = dicom.allowed_calling_aets[0] if dicom.allowed_calling_aets else STATUS_CALLING_AE
    scp: dict[str, Any] = {"ae_title": dicom.ae_title, "host": host, "port": port}
    try:
        scp["echo_ok"] = echo(host, port, calling, dicom.ae_title) == 0
    except (AssociationFailed, OSError, RuntimeError) as exc:
        scp["echo_ok"] = False
        scp["echo_error"] = str(exc)
    return scp


def database_status(settings: NodeSettings) -> dict[str, Any]:
    try:
        db = Database(settings.database_url)
        if not db.is_current():
            db.upgrade()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        with db.session() as session:
            jobs = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            return {
                "url": redact_url(settings.database_url),
                "installation_id": ensure_installation_id(session, settings.storage.data_dir),
                "studies": session.scalar(select(func.count()).select_from(Study)),
                "instances": session.scalar(select(func.count()).select_from(Instance)),
                "jobs": jobs,
                "outbox": _outbox_status(session),
                "receiving": receiving_studies(session, settings),
            }
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        db.dispose()


def receiving_studies(session: Any, settings: NodeSettings) -> list[dict[str, Any]]:
    """Studies with instances that no version covers yet: the quiet period still runs (or has
    just ended and the completion scheduler has not looked yet)."""
    rows = session.execute(
        select(
            Study.study_instance_uid,
            Study.modality,
            Study.calling_ae,
            Study.last_received_at,
            func.count(Instance.id),
        )
        .join(Instance, Instance.study_id == Study.id)
        .where(Study.has_unversioned.is_(True))
        .group_by(Study.id)
        .order_by(Study.last_received_at)
    ).all()
    now = utcnow()
    studies = []
    for uid, modality, calling_ae, last_received, count in rows:
        quiet = settings.completion.quiet_seconds(modality, calling_ae)
        studies.append(
            {
                "study_instance_uid": uid,
                "modality": modality,
                "calling_ae": calling_ae,
                "instances": count,
                "last_received_at": last_received.isoformat(),
                "quiet_period_s": quiet,
                "remaining_s": round(max(quiet - (now - last_received).total_seconds(), 0.0), 1),
            }
        )
    return studies


def _outbox_status(session: Any) -> dict[str, dict[str, Any]]:
    """Per destination: counts by status and the newest error of an unsent row."""
    outbox: dict[str, dict[str, Any]] = {}
    rows = session.execute(
        select(OutboxItem.destination, OutboxItem.status, func.count()).group_by(
            OutboxItem.destination, OutboxItem.status
        )
    ).all()
    for destination, status, count in rows:
        outbox.setdefault(destination, {"counts": {}, "last_error": None})["counts"][status] = count
    for destination, entry in outbox.items():
        entry["last_error"] = session.scalar(
            select(OutboxItem.last_error)
            .where(
                OutboxItem.destination == destination,
                OutboxItem.status != OutboxStatus.SENT,
                OutboxItem.last_error.is_not(None),
            )
            .order_by(OutboxItem.id.desc())
            .limit(1)
        )
    return outbox


def print_status(report: dict[str, Any], console: Console) -> None:
    table = Table(show_header=False)
    _scp_rows(table, report)
    _model_rows(table, report)
    _database_rows(table, report["database"])
    free, watermark = report["disk_free_mb"], report["disk_watermark_mb"]
    table.add_row("disk free", f"{free:.0f} MB (watermark {watermark} MB)")
    _retention_rows(table, report.get("retention", {}))
    console.print(table)


def _retention_rows(table: Table, retention: dict[str, Any]) -> None:
    if "error" in retention:
        table.add_row("retention", f"[red]{retention['error']}[/red]")
        return
    if not retention:
        return
    state = "on" if retention["enabled"] else "[yellow]off[/yellow]"
    table.add_row(
        "retention",
        f"{state}; prunable now: {retention['prunable_studies']} studies, "
        f"{retention['prunable_mb']:.1f} MB (free-space target "
        f"{retention['free_space_target_mb']} MB)",
    )


def _scp_rows(table: Table, report: dict[str, Any]) -> None:
    scp = report["scp"]
    echo_text = (
        "[green]ok[/green]"
        if scp.get("echo_ok")
        else f"[red]failed[/red] {scp.get('echo_error', '')}"
    )
    table.add_row(
        "DICOM SCP", f"{scp['ae_title']} @ {scp['host']}:{scp['port']}  C-ECHO {echo_text}"
    )
    process = report["process"]
    if not process:
        table.add_row("serve", "[yellow]not running[/yellow]")
        return
    table.add_row("serve", f"pid {process['pid']} since {process['started_at']}")
    if process.get("api"):
        table.add_row("REST API", f"{process['api']['url']}  (docs: /api/docs)")
    for name, part in sorted(process.get("parts", {}).items()):
        error = part.get("last_error")
        table.add_row(f"  {name}", f"[red]{error}[/red]" if error else "[green]ok[/green]")


def _model_rows(table: Table, report: dict[str, Any]) -> None:
    for worker_state in report["workers"]:
        model = worker_state.get("model", {})
        table.add_row("model", _model_text(model))
        error = model.get("worker", {}).get("last_error")
        if error:
            table.add_row("  worker error", f"[red]{error}[/red]")
        priors = worker_state.get("priors") or {}
        if priors:
            table.add_row("priors", priors_text(priors))
    if not report["workers"]:
        table.add_row("model", "[yellow]no inference worker running[/yellow]")


def priors_text(priors: dict[str, Any]) -> str:
    """[priors] of one worker: the PACS, how many searches found a prior, the last error."""
    text = (
        f"{priors.get('pacs', '?')} by C-{str(priors.get('mode', '?')).upper()}: "
        f"{priors.get('compared', 0)} of {priors.get('searches', 0)} studies compared"
    )
    error = priors.get("last_error")
    if error:
        text += f"  [red]last error {priors.get('last_error_at', '')}: {error}[/red]"
    return text


def _model_text(model: dict[str, Any]) -> str:
    if model.get("status") != "loaded":
        return f"[yellow]{model.get('status', 'unknown')}[/yellow] {model.get('message', '')}"
    identity = model["identity"]
    test = (
        " [bold red]TEST MODEL – NOT FOR CLINICAL USE[/bold red]"
        if identity.get("is_test_model")
        else ""
    )
    return f"{identity['model_id']} on {identity['device']} ({identity['dtype']}){test}"


def _database_rows(table: Table, database: dict[str, Any]) -> None:
    if "error" in database:
        table.add_row("database", f"[red]{database['error']}[/red]")
        return
    table.add_row("database", database["url"])
    table.add_row("installation id", database["installation_id"])
    table.add_row("studies / instances", f"{database['studies']} / {database['instances']}")
    jobs = ", ".join(f"{k}: {v}" for k, v in sorted(database["jobs"].items()))
    table.add_row("jobs", jobs or "none")
    for destination, entry in sorted(database["outbox"].items()):
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(entry["counts"].items()))
        error = f"  [red]last error: {entry['last_error']}[/red]" if entry["last_error"] else ""
        table.add_row(f"outbox {destination}", counts + error)
    for study in database.get("receiving", []):
        table.add_row(
            "receiving",
            f"{study['study_instance_uid']} {study['modality']} from {study['calling_ae']}: "
            f"{study['instances']} instance(s), {study['remaining_s']:.0f} s of "
            f"{study['quiet_period_s']:.0f} s quiet period left",
        )


def redact_url(url: str) -> str:
    """Hide a password in a database URL."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url
