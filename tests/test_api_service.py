"""The REST API of a running `medgemma-node serve`, on real studies, through a real socket.

One node for the module (scripted engine, a file destination, a DICOM destination nobody
listens to for studies from one calling AE) receives the real chest radiograph RG1_UNCI three
times, as three studies:

    DELIVERED  answered with a boxed nodule; its JSON report reaches the file destination
    DEAD       answered too, but routed to the DICOM destination that is down: failed delivery
    FAILED     its stored file is deleted during its (longer) quiet period, as a lost disk
               would: preprocessing fails and so does the job
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from api.images import BOX_COLOUR, MODEL_INPUT_SIDE
from inference.preprocess import prepare_study
from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, testdata
from peers.net import free_port, wait_for
from peers.node_process import NodeProcess, run_cli
from storage.db import Database
from storage.models import AuditEvent, UserRole
from tests.api_support import bearer
from tests.nodecheck import instances_of

pytestmark = pytest.mark.slow

PATIENT_NAME = "Wendeline^Oberkampf"
PATIENT_ID = "PID-API-93117"
DEAD_ROUTE_AE = "DEADROUTE"
LOST_FILE_AE = "LOSTFILE"
ANSWER = {
    "findings": [
        {
            "label": "nodule",
            "location": "right upper lobe",
            "size_mm": 14,
            "box_2d": [210, 180, 330, 300],
        },
        {"label": "pleural effusion", "location": "left costophrenic angle"},
    ],
    "impression": "Right upper lobe nodule.",
    "recommendation": "CT chest.",
    "urgency": "urgent",
}
# RG1_UNCI: 1955 rows x 1841 columns; the model's square is 1955 px with 57 px padding left.
RG1_ROWS, RG1_COLUMNS = 1955, 1841


@dataclass
class ApiNode:
    node: NodeProcess
    tokens: dict[str, str]
    delivered: pydicom.Dataset
    dead: pydicom.Dataset
    failed: pydicom.Dataset
    work: Path

    def client(self, role: str | None = None) -> httpx.Client:
        headers = bearer(self.tokens[role]) if role else {}
        return httpx.Client(base_url=self.node.api_url, headers=headers, timeout=60)

    def get(self, path: str, role: str = "viewer", **params: Any) -> httpx.Response:
        with self.client(role) as client:
            return client.get(path, params=params)


def add_user(node: NodeProcess, name: str, role: str) -> str:
    result = run_cli("api", "add-user", name, "--role", role, "--config", str(node.config_path))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def send(node: NodeProcess, work: Path, name: str, aet: str) -> pydicom.Dataset:
    copy = copy_with_new_uids(
        testdata("RG1_UNCI.dcm"),
        work / "send" / f"{name}.dcm",
        PatientName=PATIENT_NAME,
        PatientID=PATIENT_ID,
    )
    result = dcmtk_storescu(node.port, [copy], "-xs", aet=aet)
    assert result.returncode == 0, result.stderr
    return pydicom.dcmread(copy, stop_before_pixels=True)


def study_status(api: ApiNode, study_uid: str) -> str | None:
    response = api.get(f"/studies/{study_uid}")
    return str(response.json()["status"]) if response.status_code == 200 else None


def wait_status(api: ApiNode, study_uid: str, wanted: str) -> None:
    try:
        wait_for(lambda: study_status(api, study_uid) == wanted, 90)
    except TimeoutError:
        status = study_status(api, study_uid)
        pytest.fail(f"study is {status}, not {wanted}:\n{api.node.log_text()[-4000:]}")


def delete_stored_files(node: NodeProcess, study_uid: str) -> None:
    db = Database(node.database_url)
    try:
        for instance in instances_of(db, study_uid):
            (node.data_dir / instance.path).unlink()
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiNode]:
    work = tmp_path_factory.mktemp("api")
    answers = work / "answers.json"
    answers.write_text(json.dumps([json.dumps(ANSWER)]), encoding="utf-8")
    sections = {
        "completion": {
            "default_seconds": 0.5,
            "poll_interval_s": 0.1,
            "rules": [{"calling_ae": LOST_FILE_AE, "seconds": 3.0}],
        },
        "model": {
            "engine": "scripted",
            "scripted_responses_file": str(answers),
            "max_attempts": 1,
            "batch_wait_ms": 0,
        },
        "destinations": [
            {"name": "files", "kind": "file", "directory": str(work / "results")},
            {
                "name": "pacs",
                "kind": "dicom",
                "ae_title": "NOBODY",
                "host": "127.0.0.1",
                "port": free_port(),  # nothing listens: every attempt fails
                "only_calling_aets": [DEAD_ROUTE_AE],
                "retry": {"max_attempts": 1, "initial_backoff_s": 0.1},
            },
        ],
        "api": {"enabled": True, "port": free_port()},
    }
    node = NodeProcess(work / "node", sections).start()
    try:
        tokens = {role.value: add_user(node, f"{role.value}-1", role.value) for role in UserRole}
        api = ApiNode(node, tokens, None, None, None, work)  # type: ignore[arg-type]
        api.delivered = send(node, work, "delivered", "MODALITY1")
        wait_status(api, api.delivered.StudyInstanceUID, "delivered")
        api.dead = send(node, work, "dead", DEAD_ROUTE_AE)
        wait_status(api, api.dead.StudyInstanceUID, "failed")
        api.failed = send(node, work, "failed", LOST_FILE_AE)
        delete_stored_files(node, api.failed.StudyInstanceUID)
        wait_status(api, api.failed.StudyInstanceUID, "failed")
        yield api
    finally:
        node.terminate()


# --------------------------------------------------------------------------- access


def test_health_needs_no_token_and_everything_else_does(api: ApiNode) -> None:
    with api.client() as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}
        for path in ("/ready", "/me", "/studies", f"/studies/{api.delivered.StudyInstanceUID}"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = anonymous.get("/studies", headers=bearer("mgn_not-a-token"))
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    ("role", "expected"), [("viewer", 403), ("radiologist", 403), ("admin", 200)]
)
def test_admin_endpoints_need_the_admin_role(api: ApiNode, role: str, expected: int) -> None:
    assert api.get("/jobs", role).status_code == expected
    assert api.get("/outbox", role).status_code == expected
    with api.client(role) as client:
        retry = client.post("/outbox/retry-dead", params={"destination": "no-such"})
    assert retry.status_code == expected


def test_me_names_the_user_and_role(api: ApiNode) -> None:
    assert api.get("/me", "radiologist").json() == {"name": "radiologist-1", "role": "radiologist"}


def test_ready_when_scp_database_and_model_are(api: ApiNode) -> None:
    response = api.get("/ready")
    body = response.json()
    assert response.status_code == 200, body
    assert body["ready"] is True and body["reasons"] == []
    assert body["scp"]["listening"] is True and body["scp"]["port"] == api.node.port
    assert body["database"]["reachable"] is True
    assert body["model"]["loaded"] is True
    assert body["model"]["identity"]["is_test_model"] is True


# --------------------------------------------------------------------------- worklist


def uids(page: dict[str, Any]) -> list[str]:
    return [item["study_instance_uid"] for item in page["items"]]


def test_worklist_newest_first_with_derived_status_and_patient(api: ApiNode) -> None:
    page = api.get("/studies").json()
    assert page["total"] == 3
    assert uids(page) == [
        api.failed.StudyInstanceUID,
        api.dead.StudyInstanceUID,
        api.delivered.StudyInstanceUID,
    ]
    statuses = {item["study_instance_uid"]: item["status"] for item in page["items"]}
    assert statuses[api.delivered.StudyInstanceUID] == "delivered"
    assert statuses[api.dead.StudyInstanceUID] == "failed"
    first = page["items"][-1]
    assert first["patient"] == {"name": PATIENT_NAME, "id": PATIENT_ID}
    assert first["modality"] == "CR" and first["calling_ae"] == "MODALITY1"
    assert first["instance_count"] == 1 and first["series_count"] == 1
    assert first["urgency"] == "urgent" and first["latest_report_id"] is not None
    lost = page["items"][0]  # its file is gone: the worklist still lists it, without names
    assert lost["patient"] == {"name": None, "id": None} and lost["latest_report_id"] is None


def test_worklist_filters_and_pages(api: ApiNode) -> None:
    delivered, dead = api.delivered.StudyInstanceUID, api.dead.StudyInstanceUID
    assert uids(api.get("/studies", status="delivered").json()) == [delivered]
    with api.client("viewer") as client:
        both = client.get("/studies", params=[("status", "delivered"), ("status", "failed")])
    assert both.json()["total"] == 3
    assert api.get("/studies", modality="cr").json()["total"] == 3
    assert api.get("/studies", modality="CT").json()["total"] == 0
    assert uids(api.get("/studies", q=delivered[-12:]).json()) == [delivered]
    assert uids(api.get("/studies", q=DEAD_ROUTE_AE.lower()).json()) == [dead]
    assert api.get("/studies", q="right upper lobe").json()["total"] == 2  # report text
    assert api.get("/studies", since="2000-01-01", until="2000-01-02").json()["total"] == 0
    assert api.get("/studies", since="2000-01-01T00:00:00Z").json()["total"] == 3
    page = api.get("/studies", limit=1, offset=1).json()
    assert uids(page) == [dead] and page["total"] == 3 and page["limit"] == 1


# --------------------------------------------------------------------------- one study


def test_study_detail_has_everything_the_node_did(api: ApiNode) -> None:
    study_uid = api.delivered.StudyInstanceUID
    detail = api.get(f"/studies/{study_uid}").json()
    [series] = detail["series"]
    assert series["series_instance_uid"] == api.delivered.SeriesInstanceUID
    [instance] = series["instances"]
    assert instance["sop_instance_uid"] == api.delivered.SOPInstanceUID
    [version] = detail["versions"]
    assert version["sop_instance_uids"] == [api.delivered.SOPInstanceUID]
    [job] = detail["jobs"]
    assert job["status"] == "done" and job["id"] == version["job_id"]
    [report] = detail["reports"]
    assert {o["kind"] for o in report["objects"]} == {"sr", "gsps"}
    assert [(d["destination"], d["status"]) for d in detail["deliveries"]] == [("files", "sent")]
    assert detail["patient"]["name"] == PATIENT_NAME


def report_id(api: ApiNode, study: pydicom.Dataset) -> int:
    return int(api.get(f"/studies/{study.StudyInstanceUID}").json()["reports"][0]["id"])


def test_report_as_json_says_what_it_is(api: ApiNode) -> None:
    study_uid = api.delivered.StudyInstanceUID
    report = api.get(f"/studies/{study_uid}/reports/{report_id(api, api.delivered)}").json()
    assert report["study_instance_uid"] == study_uid
    content = report["content"]
    assert [f["label"] for f in content["findings"]] == ["nodule", "pleural effusion"]
    region = content["findings"][0]["region"]
    assert region["sop_instance_uid"] == api.delivered.SOPInstanceUID
    assert region["x0"] == pytest.approx(180 / 1000 * RG1_ROWS - 57, abs=1.5)
    assert content["impression"] == ANSWER["impression"] and report["urgency"] == "urgent"
    assert "TEST MODEL" in report["disclaimer"] and "physician" in report["disclaimer"]
    assert report["model"]["is_test_model"] is True


def test_report_as_sr_is_the_dicom_file(api: ApiNode) -> None:
    study_uid = api.delivered.StudyInstanceUID
    rid = report_id(api, api.delivered)
    response = api.get(f"/studies/{study_uid}/reports/{rid}", format="sr")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(response.content))
    listed = api.get(f"/studies/{study_uid}/reports/{rid}").json()["objects"]
    assert sr.SOPInstanceUID == next(o["sop_instance_uid"] for o in listed if o["kind"] == "sr")
    assert sr.StudyInstanceUID == study_uid and sr.VerificationFlag == "UNVERIFIED"


def png(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def image_path(api: ApiNode) -> str:
    study = api.delivered
    return f"/studies/{study.StudyInstanceUID}/instances/{study.SOPInstanceUID}/image.png"


def test_image_as_the_model_saw_it(api: ApiNode) -> None:
    image = png(api.get(image_path(api)))
    assert image.size == (MODEL_INPUT_SIDE, MODEL_INPUT_SIDE)
    source = api.work / "send" / "delivered.dcm"
    seen = prepare_study([source]).images[0]
    expected = seen.resize(image.size, Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert np.asarray(image)[:, :20].max() == 0  # the padding left of the image is black


def test_image_at_a_size_and_with_the_boxes(api: ApiNode) -> None:
    sized = png(api.get(image_path(api), size=512))
    assert sized.size == (round(RG1_COLUMNS * 512 / RG1_ROWS), 512)
    assert png(api.get(image_path(api), size=0)).size == (RG1_COLUMNS, RG1_ROWS)
    larger = png(api.get(image_path(api), size=4000))
    assert larger.size == (RG1_COLUMNS, RG1_ROWS)  # never enlarged
    plain = np.asarray(png(api.get(image_path(api))))
    boxed = np.asarray(png(api.get(image_path(api), overlay=1)))
    # box_2d [210, 180, 330, 300] of the square: the left edge at x = 0.18 * 896, rows 0.21..0.33
    x, y_mid = round(0.18 * MODEL_INPUT_SIDE), round(0.27 * MODEL_INPUT_SIDE)
    assert tuple(boxed[y_mid, x]) == BOX_COLOUR
    assert tuple(plain[y_mid, x]) != BOX_COLOUR
    assert np.array_equal(boxed[:, 600:], plain[:, 600:])  # nothing drawn away from the box
    sized_boxed = np.asarray(png(api.get(image_path(api), size=512, overlay=1)))
    left = round((0.18 * RG1_ROWS - 57) * 512 / RG1_ROWS)
    assert tuple(sized_boxed[round(0.27 * 512), left]) == BOX_COLOUR


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/studies/1.2.999.404", {}),
        ("/studies/{study}/reports/999999", {}),
        ("/studies/{other}/reports/{report}", {}),
        ("/studies/{study}/instances/1.2.999.404/image.png", {}),
        ("/studies/{other}/instances/{sop}/image.png", {}),
        ("/studies/{study}/instances/{sop}/image.png", {"overlay": 1, "report_id": 999999}),
    ],
)
def test_unknown_things_are_404(api: ApiNode, path: str, params: dict[str, Any]) -> None:
    filled = path.format(
        study=api.delivered.StudyInstanceUID,
        other=api.dead.StudyInstanceUID,
        report=report_id(api, api.delivered),
        sop=api.delivered.SOPInstanceUID,
    )
    response = api.get(filled, **params)
    assert response.status_code == 404, response.text
    assert response.json()["detail"].startswith("no ")


def test_image_of_a_lost_file_is_404(api: ApiNode) -> None:
    study = api.failed
    path = f"/studies/{study.StudyInstanceUID}/instances/{study.SOPInstanceUID}/image.png"
    response = api.get(path)
    assert response.status_code == 404
    assert "no longer stored" in response.json()["detail"]


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        ("/studies", {"limit": 0}, "limit"),
        ("/studies", {"limit": "many"}, "limit"),
        ("/studies", {"offset": -1}, "offset"),
        ("/studies", {"status": "lost"}, "status"),
        ("/studies", {"since": "yesterday"}, "since"),
        ("/studies", {"modality": "C R;"}, "modality"),
        ("/studies/{study}/reports/{report}", {"format": "xml"}, "format"),
        ("/studies/{study}/reports/abc", {}, "report_id"),
        ("/studies/{study}/instances/{sop}/image.png", {"size": -1}, "size"),
        ("/studies/{study}/instances/{sop}/image.png", {"overlay": "perhaps"}, "overlay"),
        ("/studies/" + "1" * 65, {}, "study_uid"),
    ],
)
def test_malformed_parameters_are_422_naming_the_parameter(
    api: ApiNode, path: str, params: dict[str, Any], named: str
) -> None:
    filled = path.format(
        study=api.delivered.StudyInstanceUID,
        report=report_id(api, api.delivered),
        sop=api.delivered.SOPInstanceUID,
    )
    response = api.get(filled, **params)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"][1] == named and error["msg"]
    assert api.get("/health").status_code == 200  # and the node keeps serving


def test_until_before_since_is_422(api: ApiNode) -> None:
    response = api.get("/studies", since="2026-01-02", until="2026-01-01")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "until"] and "after since" in error["msg"]


# --------------------------------------------------------------------------- admin


def test_job_list_and_retry(api: ApiNode) -> None:
    failed = api.get("/jobs", "admin", status="failed").json()
    [job] = [j for j in failed["items"] if j["study_instance_uid"] == api.failed.StudyInstanceUID]
    assert "unreadable" in job["last_error"] or "no instance" in job["last_error"]
    assert api.get("/jobs", "admin").json()["total"] == 3
    with api.client("admin") as admin:
        retried = admin.post(f"/jobs/{job['id']}/retry")
        done_job = api.get("/jobs", "admin", status="done").json()["items"][0]
        conflict = admin.post(f"/jobs/{done_job['id']}/retry")
        missing = admin.post("/jobs/999999/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"id": job["id"], "previous_status": "failed", "status": "queued"}
    assert conflict.status_code == 409 and "done" in conflict.json()["detail"]
    assert missing.status_code == 404

    def failed_again() -> bool:
        jobs = api.get("/jobs", "admin", status="failed").json()["items"]
        return any(j["id"] == job["id"] and j["updated_at"] > job["updated_at"] for j in jobs)

    wait_for(failed_again, 60, message="the retried job did not run again")


def test_outbox_list_and_retry(api: ApiNode) -> None:
    dead = api.get("/outbox", "admin", status="dead").json()
    assert dead and all(row["destination"] == "pacs" for row in dead)
    sent = api.get("/outbox", "admin", status="sent").json()
    assert [row["destination"] for row in sent] == ["files", "files"]
    with api.client("admin") as admin:
        retried = admin.post(f"/outbox/{dead[0]['id']}/retry")
        already = admin.post(f"/outbox/{sent[0]['id']}/retry")
        missing = admin.post("/outbox/999999/retry")
    assert retried.json() == {"id": dead[0]["id"], "previous_status": "dead", "status": "pending"}
    assert already.status_code == 409 and missing.status_code == 404

    def dead_again() -> bool:
        rows = api.get("/outbox", "admin", status="dead").json()
        return any(r["id"] == dead[0]["id"] and r["attempts"] == 1 for r in rows)

    wait_for(dead_again, 60, message="the retried delivery was not attempted again")
    with api.client("admin") as admin:
        every = admin.post("/outbox/retry-dead", params={"destination": "pacs"}).json()
    assert every["count"] == len(dead)


# --------------------------------------------------------------------------- trail and logs


def test_every_access_is_audited_without_patient_data(api: ApiNode) -> None:
    study_uid = api.delivered.StudyInstanceUID
    api.get(f"/studies/{study_uid}", "radiologist")
    with api.client() as anonymous:
        anonymous.get("/studies")
    db = Database(api.node.database_url)
    try:
        with db.session() as session:
            events = list(
                session.scalars(select(AuditEvent).where(AuditEvent.kind == "api.access"))
            )
    finally:
        db.dispose()
    details = [e.detail for e in events]
    assert any(
        e.detail["user"] == "radiologist-1"
        and e.detail["route"] == "/api/studies/{study_uid}"
        and e.study_instance_uid == study_uid
        and e.detail["status"] == 200
        for e in events
    )
    assert any(d["user"] is None and d["status"] == 401 for d in details)
    assert not any(d["route"] == "/api/health" for d in details)  # probes are not recorded
    trail = json.dumps(details)
    assert PATIENT_NAME.split("^")[0] not in trail and PATIENT_ID not in trail


def test_no_patient_data_in_the_logs(api: ApiNode) -> None:
    api.get("/studies", q=PATIENT_NAME)  # a search for the name: answered, never logged
    logs = api.node.log_text()
    assert "REST API on http://127.0.0.1" in logs
    for value in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID):
        assert value not in logs


# --------------------------------------------------------------------------- users (CLI)


def test_cli_users_and_revocation(api: ApiNode) -> None:
    config = str(api.node.config_path)
    token = add_user(api.node, "temp-reader", "viewer")
    with httpx.Client(base_url=api.node.api_url, headers=bearer(token)) as client:
        assert client.get("/me").json() == {"name": "temp-reader", "role": "viewer"}
        listed = run_cli("api", "list-users", "--json", "--config", config)
        assert listed.returncode == 0, listed.stderr
        names = {row["name"]: row for row in json.loads(listed.stdout)}
        assert names["temp-reader"]["active"] is True and names["admin-1"]["role"] == "admin"
        assert token not in listed.stdout
        duplicate = run_cli("api", "add-user", "temp-reader", "--role", "admin", "--config", config)
        assert duplicate.returncode == 1 and "exists" in duplicate.stderr
        revoked = run_cli("api", "revoke-user", "temp-reader", "--config", config)
        assert revoked.returncode == 0, revoked.stderr
        assert client.get("/me").status_code == 401
        again = run_cli("api", "revoke-user", "temp-reader", "--config", config)
        assert again.returncode == 1
    new_token = add_user(api.node, "temp-reader", "radiologist")  # reinstated, new token
    assert new_token != token
    assert api_me(api, new_token) == {"name": "temp-reader", "role": "radiologist"}
    assert api_status(api, token) == 401


def api_me(api: ApiNode, token: str) -> Any:
    with httpx.Client(base_url=api.node.api_url, headers=bearer(token)) as client:
        return client.get("/me").json()


def api_status(api: ApiNode, token: str) -> int:
    with httpx.Client(base_url=api.node.api_url, headers=bearer(token)) as client:
        return client.get("/me").status_code


# --------------------------------------------------------------------------- no weights


def test_ready_is_503_with_how_to_provide_weights(tmp_path: Path) -> None:
    weights = tmp_path / "no-such-weights"
    sections = {
        "model": {"model_path": str(weights)},
        "api": {"enabled": True, "port": free_port()},
    }
    node = NodeProcess(tmp_path / "node", sections, extra_env={"HF_HOME": str(tmp_path / "hf")})
    node.start()
    try:
        token = add_user(node, "ops", "viewer")

        def not_ready_for_weights() -> httpx.Response | None:
            with httpx.Client(base_url=node.api_url, headers=bearer(token)) as client:
                response = client.get("/ready")
            model = response.json()["model"]
            return response if model["status"] == "missing weights" else None

        response = wait_for(not_ready_for_weights, 60, message="no missing-weights readiness")
        status = run_cli("status", "--config", str(node.config_path), "--json")
    finally:
        assert node.terminate() == 0
    body = response.json()
    assert response.status_code == 503 and body["ready"] is False
    assert body["scp"]["listening"] is True and body["database"]["reachable"] is True
    message = body["model"]["message"]
    assert str(weights) in message and "model_path" in message
    [worker] = json.loads(status.stdout)["workers"]
    assert worker["model"]["message"] == message  # the same words as `status`
    assert any("missing weights" in reason for reason in body["reasons"])
