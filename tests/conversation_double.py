"""TEST DOUBLE of the REST API's four conversation endpoints — not the node's implementation.

The console's browser tests use it only while the node under test does not serve these routes
yet (its OpenAPI document lacks them); when the node does, the tests talk to the node. It
follows the contract of the REST API issue:

    POST /api/studies/{study_uid}/conversations          -> {"id", "state", "anchors", "turns"}
    POST /api/conversations/{id}/messages {question, anchor_id?}
         -> {"answer", "findings", "anchors": [{"id", "label", "box": [x0, y0, x1, y1],
             "image_sop_uid"}], "new_anchor_ids", "referenced_anchor_id", "disclaimer"}
    GET  /api/conversations/{id}                         -> every turn with its anchors
    POST /api/conversations/{id}/append                  -> {"report_id"} (radiologist)

What is real: the user and role (asked of the node's own `GET /api/me` with the caller's
token, so a viewer is refused here as the node refuses it) and the starting anchors A1..An
(the node's latest report of the study). What is scripted: every answer (SCRIPTED_ANSWER, one
new region SCRIPTED_BOX on the image of A1) and the appended report id (SCRIPTED_REPORT_ID).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

from peers.net import free_port, wait_for

SCRIPTED_ANSWER = "Spiculated margins. The right hilum is marked as a new region."
SCRIPTED_LABEL = "right hilum"
SCRIPTED_BOX = [700.0, 760.0, 940.0, 1000.0]  # source-image pixels [x0, y0, x1, y1]
SCRIPTED_REPORT_ID = 1000
DISCLAIMER = "TEST DOUBLE: scripted answer, not produced by any model."
ROLE_RANK = {"viewer": 0, "radiologist": 1, "admin": 2}


class Question(BaseModel):
    question: str
    anchor_id: str | None = None


@dataclass
class Conversation:
    id: int
    study_uid: str
    anchors: list[dict[str, Any]]
    turns: list[dict[str, Any]] = field(default_factory=list)
    state: str = "open"

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "study_instance_uid": self.study_uid,
            "state": self.state,
            "anchors": self.anchors,
            "turns": self.turns,
            "disclaimer": DISCLAIMER,
        }


@dataclass
class ConversationDouble:
    """The double's app and what it was asked (``calls``), for the tests to check."""

    node_api: str  # e.g. http://127.0.0.1:8080/api
    conversations: dict[int, Conversation] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def _node(self, authorization: str | None, path: str) -> Any:
        headers = {"Authorization": authorization} if authorization else {}
        response = httpx.get(f"{self.node_api}{path}", headers=headers, timeout=30)
        if response.status_code != 200:
            raise HTTPException(response.status_code, response.json().get("detail"))
        return response.json()

    def _require(self, authorization: str | None, role: str) -> str:
        user = self._node(authorization, "/me")
        if ROLE_RANK[user["role"]] < ROLE_RANK[role]:
            detail = f"this needs the {role} role; {user['name']} is {user['role']}"
            raise HTTPException(403, detail)
        return str(user["name"])

    def _report_anchors(self, authorization: str | None, study_uid: str) -> list[dict[str, Any]]:
        study = self._node(authorization, f"/studies/{study_uid}")
        if not study["reports"]:
            return []
        newest = max(r["id"] for r in study["reports"])
        report = self._node(authorization, f"/studies/{study_uid}/reports/{newest}")
        anchors = []
        for finding in report["content"]["findings"]:
            region = finding.get("region")
            if region:
                box = [region["x0"], region["y0"], region["x1"], region["y1"]]
                anchors.append(
                    {
                        "id": f"A{len(anchors) + 1}",
                        "label": finding["label"],
                        "box": box,
                        "image_sop_uid": region["sop_instance_uid"],
                        "source": "report",
                    }
                )
        return anchors

    def _conversation(self, conversation_id: int) -> Conversation:
        if conversation_id not in self.conversations:
            raise HTTPException(404, f"no conversation {conversation_id}")
        return self.conversations[conversation_id]

    def app(self) -> FastAPI:
        app = FastAPI(title="TEST DOUBLE: conversation endpoints")

        @app.post("/api/studies/{study_uid}/conversations")
        def start(study_uid: str, authorization: str | None = Header(None)) -> dict[str, Any]:
            user = self._require(authorization, "radiologist")
            anchors = self._report_anchors(authorization, study_uid)
            conversation = Conversation(len(self.conversations) + 1, study_uid, anchors)
            self.conversations[conversation.id] = conversation
            self.calls.append({"call": "start", "user": user, "study_uid": study_uid})
            return conversation.view()

        @app.post("/api/conversations/{conversation_id}/messages")
        def ask(
            conversation_id: int, body: Question, authorization: str | None = Header(None)
        ) -> dict[str, Any]:
            user = self._require(authorization, "radiologist")
            conversation = self._conversation(conversation_id)
            if conversation.state != "open":
                raise HTTPException(409, "the conversation was appended")
            self.calls.append({"call": "ask", "user": user, **body.model_dump()})
            image = conversation.anchors[0]["image_sop_uid"] if conversation.anchors else None
            new = {
                "id": f"A{len(conversation.anchors) + 1}",
                "label": SCRIPTED_LABEL,
                "box": SCRIPTED_BOX,
                "image_sop_uid": image,
                "source": "answer",
            }
            conversation.anchors = [*conversation.anchors, new]
            turn = {
                "conversation_id": conversation.id,
                "turn_index": len(conversation.turns),
                "question": body.question,
                "answer": SCRIPTED_ANSWER,
                "answered_by": "model",
                "referenced_anchor_id": body.anchor_id,
                "findings": [],
                "anchors": conversation.anchors,
                "new_anchor_ids": [new["id"]],
                "measurements": [],
                "disclaimer": DISCLAIMER,
            }
            conversation.turns.append(turn)
            return turn

        @app.get("/api/conversations/{conversation_id}")
        def get(conversation_id: int, authorization: str | None = Header(None)) -> dict[str, Any]:
            self._require(authorization, "viewer")
            return self._conversation(conversation_id).view()

        @app.post("/api/conversations/{conversation_id}/append")
        def append(
            conversation_id: int, authorization: str | None = Header(None)
        ) -> dict[str, Any]:
            user = self._require(authorization, "radiologist")
            conversation = self._conversation(conversation_id)
            conversation.state = "appended"
            self.calls.append({"call": "append", "user": user, "id": conversation_id})
            return {"report_id": SCRIPTED_REPORT_ID}

        return app


class RunningDouble:
    """The double under uvicorn on a free loopback port, in a thread."""

    def __init__(self, double: ConversationDouble) -> None:
        self.double = double
        self.port = free_port()
        config = uvicorn.Config(
            double.app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="double", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RunningDouble:
        self.thread.start()
        wait_for(self._listening, 15, message="the conversation double did not start")
        return self

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
