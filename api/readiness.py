"""`GET /api/ready`: the same facts `medgemma-node status` shows, as one yes/no with reasons.

SCP        C-ECHO to the node's own SCP on its actual port (from <data>/run/status.json)
database   a round trip on the API's own connection pool
model      the inference workers' status files (<data>/run/worker-*.json): loaded, or why not,
           with the "how to provide weights" message when they are missing
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from api.schemas import DatabaseCheck, ModelCheck, Readiness, ScpCheck
from config.settings import NodeSettings
from medgemma_node.runtime import read_runtime_state, read_worker_states
from medgemma_node.status import scp_status
from storage.db import Database
from storage.report_schema import ModelIdentity


def check_scp(settings: NodeSettings) -> ScpCheck:
    runtime = read_runtime_state(settings.storage.data_dir)
    scp = scp_status(settings, runtime)
    return ScpCheck(
        listening=bool(scp.get("echo_ok")),
        ae_title=scp["ae_title"],
        host=scp["host"],
        port=int(scp["port"]),
        error=scp.get("echo_error"),
    )


def check_database(db: Database) -> DatabaseCheck:
    try:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error: not ready, with the reason
        return DatabaseCheck(reachable=False, error=f"{type(exc).__name__}: {exc}"[:500])
    return DatabaseCheck(reachable=True)


def check_model(settings: NodeSettings) -> ModelCheck:
    workers = read_worker_states(settings.storage.data_dir)
    models: list[dict[str, Any]] = [w.get("model") or {} for w in workers]
    for model in models:
        if model.get("status") == "loaded":
            identity = ModelIdentity.model_validate(model["identity"])
            return ModelCheck(loaded=True, status="loaded", identity=identity)
    if not models:
        return ModelCheck(
            loaded=False,
            status="no worker",
            message="no inference worker is running (serve starts one; it may be starting)",
        )
    model = models[0]
    model_status = str(model.get("status") or "not loaded")
    message = model.get("message")
    if model_status == "not loaded" and not message:
        message = "the inference worker is loading the model"
    return ModelCheck(loaded=False, status=model_status, message=message)


def check_readiness(settings: NodeSettings, db: Database) -> Readiness:
    scp, database, model = check_scp(settings), check_database(db), check_model(settings)
    reasons = []
    if not scp.listening:
        reasons.append(f"DICOM SCP not answering C-ECHO on port {scp.port}: {scp.error or ''}")
    if not database.reachable:
        reasons.append(f"database not reachable: {database.error}")
    if not model.loaded:
        reasons.append(f"model {model.status}: {model.message or ''}")
    return Readiness(
        ready=not reasons,
        reasons=[r.rstrip(": ") for r in reasons],
        scp=scp,
        database=database,
        model=model,
    )
