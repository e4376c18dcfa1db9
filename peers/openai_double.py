"""TEST DOUBLE: a scripted OpenAI-compatible chat completions server on loopback.

This is not an inference server and runs no model. It stands in for vLLM (whose CPU build cannot
serve Gemma 3 on the test machines: see benchmarks/RESULTS.md) so the tests and the benchmark can
drive ``engine = "openai"`` over real HTTP. It answers the way vLLM's OpenAI server does (``GET
/v1/models``, ``GET /version``, ``POST /v1/chat/completions`` with vLLM's response and error
shapes), and it checks every chat request against the chat completions schema the node must follow:

* the body is a JSON object with only known keys; ``model`` is the served name; ``n`` = 1,
  ``stream`` false; ``max_tokens`` a positive integer; ``temperature`` 0 (the node is greedy);
* ``messages``: a non-empty list; roles ``user``/``assistant`` alternating from ``user`` and
  ending with ``user`` (MedGemma has no system role); a user content is a string or a list of
  ``{"type": "text", "text": str}`` and ``{"type": "image_url", "image_url": {"url": str}}``
  parts; every image URL is ``data:image/png;base64,...`` that decodes to a PNG;
* ``Authorization: Bearer <key>`` when the double was given a key.

A request that breaks a rule gets HTTP 400 and its reasons are kept in ``schema_errors`` (tests
assert it stays empty). Every valid request is kept in ``requests`` (roles, texts, decoded
images). ``replies`` scripts what comes back: a text, or an HTTP status with headers, or a body
that is not JSON; ``hold`` keeps requests in flight until a number of them are, so a test can
see how many the node sends at once (``max_in_flight``) without timing assertions.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from peers.net import free_port

KNOWN_KEYS = {"model", "messages", "max_tokens", "temperature", "n", "stream"}
PNG_DATA_URL = "data:image/png;base64,"
VLLM_VERSION = "0.0.0+test-double"


@dataclass
class Reply:
    """What the double answers one chat request with."""

    text: str = "No acute cardiopulmonary abnormality."
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None  # sent as is (e.g. not JSON) instead of a chat completion
    error: str = "scripted error"
    system_fingerprint: str | None = None
    delay_s: float = 0.0  # answer this much later (a server slower than the node's timeout)


@dataclass
class ChatRecord:
    """One valid chat request as the double understood it."""

    roles: list[str]
    texts: list[str]  # the text of every message, in order
    images: list[Image.Image]  # every image, in the order sent
    max_tokens: int
    body: dict[str, Any]


Responder = Callable[[ChatRecord], Reply]


def _validate_part(
    part: Any, where: str, images: list[Image.Image], decode: bool = True
) -> tuple[str, list[str]]:
    """(text of the part, errors). ``decode`` False checks the URL's form only."""
    if not isinstance(part, dict):
        return "", [f"{where}: a content part must be an object"]
    kind = part.get("type")
    if kind == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            return "", [f"{where}: a text part is {{type, text: str}}"]
        return part["text"], []
    if kind != "image_url":
        return "", [f"{where}: unknown part type {kind!r}"]
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if set(part) != {"type", "image_url"} or not isinstance(url, str):
        return "", [f"{where}: an image part is {{type, image_url: {{url: str}}}}"]
    if not url.startswith(PNG_DATA_URL):
        return "", [f"{where}: image URL is not a data:image/png;base64 URL"]
    if not decode:
        images.append(Image.new("RGB", (1, 1)))
        return "", []
    try:
        data = base64.b64decode(url[len(PNG_DATA_URL) :], validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, ValueError, OSError) as exc:
        return "", [f"{where}: image does not decode: {exc}"]
    if image.format != "PNG":
        return "", [f"{where}: image is {image.format}, not PNG"]
    images.append(image)
    return "", []


def _validate_message(
    message: Any, position: int, images: list[Image.Image], decode: bool = True
) -> tuple[str, str, list[str]]:
    """(role, text, errors) of one message."""
    where = f"messages[{position}]"
    if not isinstance(message, dict) or set(message) - {"role", "content"}:
        return "", "", [f"{where}: a message is {{role, content}}"]
    role, content = message.get("role"), message.get("content")
    expected = "user" if position % 2 == 0 else "assistant"
    errors = [] if role == expected else [f"{where}: role {role!r}, expected {expected!r}"]
    if isinstance(content, str):
        return str(role), content, errors
    if not isinstance(content, list) or not content:
        return str(role), "", [*errors, f"{where}: content is a string or a non-empty list"]
    texts = []
    for index, part in enumerate(content):
        text, part_errors = _validate_part(part, f"{where}.content[{index}]", images, decode)
        texts.append(text)
        errors += part_errors
    return str(role), "".join(texts), errors


def validate_chat_request(
    body: Any, served_model: str, decode_images: bool = True
) -> tuple[ChatRecord | None, list[str]]:
    """The request as a record, or None and every rule it breaks."""
    if not isinstance(body, dict):
        return None, ["the body is not a JSON object"]
    errors = [f"unknown key {key!r}" for key in sorted(set(body) - KNOWN_KEYS)]
    if body.get("model") != served_model:
        errors.append(f"model {body.get('model')!r} is not {served_model!r}")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        errors.append("max_tokens must be a positive integer")
    if body.get("temperature") != 0:
        errors.append(f"temperature {body.get('temperature')!r}: the node decodes greedily")
    if body.get("n", 1) != 1 or body.get("stream", False) is not False:
        errors.append("n must be 1 and stream false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, [*errors, "messages must be a non-empty list"]
    roles: list[str] = []
    texts: list[str] = []
    images: list[Image.Image] = []
    for position, message in enumerate(messages):
        role, text, message_errors = _validate_message(message, position, images, decode_images)
        roles.append(role)
        texts.append(text)
        errors += message_errors
    if roles[-1] != "user":
        errors.append("the last message must be the user's")
    if errors:
        return None, errors
    assert isinstance(max_tokens, int)
    return ChatRecord(roles, texts, images, max_tokens, body), []


class OpenAIDouble:
    """TEST DOUBLE of an OpenAI-compatible server (module docstring). ``start()`` binds a free
    loopback port (or ``port``); ``base_url`` is what ``[model.openai] base_url`` takes."""

    def __init__(
        self,
        served_model: str = "google/medgemma-1.5-4b-it",
        api_key: str | None = None,
        port: int | None = None,
        root: str = "/models/medgemma-1.5-4b-it",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.served_model = served_model
        self.ssl_context = ssl_context
        self.api_key = api_key
        self.port = port or free_port()
        self.root = root
        self.created = int(time.time())
        self.replies: list[Reply] = []  # used in order; then ``responder``, else the default
        self.responder: Responder | None = None
        self.requests: list[ChatRecord] = []
        self.schema_errors: list[str] = []
        self.paths: list[str] = []  # every request line's path, in order
        self.auth_failures = 0
        self.hold_until_in_flight: int | None = None  # hold answers until this many are in
        self.hold_timeout_s = 5.0  # ... or this long (a safety net, never a test condition)
        # False: image URLs checked for their form only, not decoded (a benchmark keeps the
        # double's CPU time out of the node's figure; the images are then 1x1 stand-ins).
        self.decode_images = True
        self.request_bytes: list[int] = []  # body size of every chat request
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Condition()
        self._connections: set[socket.socket] = set()  # closed by stop(), as a dying server's
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAIDouble:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._server.daemon_threads = True
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(
                self._server.socket, server_side=True
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="openai-double", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (keep-alive ones too)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIDouble:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- what the handler calls ------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        entry = {
            "id": self.served_model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.root,
            "parent": None,
            "max_model_len": 8192,
        }
        return {"object": "list", "data": [entry]}

    def authorised(self, header: str | None) -> bool:
        if self.api_key is None or header == f"Bearer {self.api_key}":
            return True
        with self._lock:
            self.auth_failures += 1
        return False

    def chat(self, body: Any) -> tuple[Reply, ChatRecord | None]:
        record, errors = validate_chat_request(body, self.served_model, self.decode_images)
        if record is None:
            with self._lock:
                self.schema_errors += errors
            return Reply(status=400, error="; ".join(errors)), None
        with self._lock:
            self.requests.append(record)
            reply = self.replies.pop(0) if self.replies else None
        if reply is None:
            reply = self.responder(record) if self.responder is not None else Reply()
        return reply, record

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._lock.notify_all()
            if self.hold_until_in_flight is not None:
                deadline = time.monotonic() + self.hold_timeout_s
                while self.in_flight < self.hold_until_in_flight and time.monotonic() < deadline:
                    self._lock.wait(timeout=max(deadline - time.monotonic(), 0.0))

    def opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def completion(model: str, reply: Reply, record: ChatRecord) -> dict[str, Any]:
    """A chat completion shaped like vLLM's."""
    prompt_tokens = sum(len(t.split()) for t in record.texts) + 256 * len(record.images)
    completion_tokens = min(len(reply.text.split()), record.max_tokens)
    return {
        "id": f"chatcmpl-{time.monotonic_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        },
        "prompt_logprobs": None,
        "system_fingerprint": reply.system_fingerprint,
    }


def _error_body(status: int, message: str) -> dict[str, Any]:
    """vLLM's error shape."""
    return {"object": "error", "message": message, "type": "BadRequestError", "code": status}


def _handler(double: OpenAIDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM (uvicorn) does

        def setup(self) -> None:
            super().setup()
            double.opened(self.connection)

        def finish(self) -> None:
            double.closed(self.connection)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read the records, not a log

        def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            self._send_bytes(status, json.dumps(data).encode(), "application/json", headers)

        def _send_bytes(
            self,
            status: int,
            payload: bytes,
            content_type: str,
            headers: dict[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            double.paths.append(self.path)
            if not double.authorised(self.headers.get("Authorization")):
                self._send_json(401, _error_body(401, "Unauthorized"))
            elif self.path == "/v1/models":
                self._send_json(200, double.models())
            elif self.path == "/version":
                self._send_json(200, {"version": VLLM_VERSION})
            else:
                self._send_json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            double.paths.append(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            double.request_bytes.append(len(raw))
            if not double.authorised(self.headers.get("Authorization")):
                self._send_json(401, _error_body(401, "Unauthorized"))
                return
            if self.path != "/v1/chat/completions":
                self._send_json(404, {"detail": "Not Found"})
                return
            try:
                body = json.loads(raw)
            except ValueError:
                double.schema_errors.append("the body is not JSON")
                self._send_json(400, _error_body(400, "the body is not JSON"))
                return
            double.enter()
            try:
                self._answer(body)
            finally:
                double.leave()

        def _answer(self, body: Any) -> None:
            reply, record = double.chat(body)
            if reply.delay_s:
                time.sleep(reply.delay_s)
            if reply.raw_body is not None:
                self._send_bytes(reply.status, reply.raw_body, "text/plain", reply.headers)
            elif reply.status != 200 or record is None:
                self._send_json(reply.status, _error_body(reply.status, reply.error), reply.headers)
            else:
                self._send_json(200, completion(double.served_model, reply, record), reply.headers)

    return Handler
