"""The engine of a node without a GPU: each study goes to an OpenAI-compatible inference server.

vLLM, SGLang and TGI serve Gemma 3 with images behind the OpenAI chat completions API
(``POST {base_url}/chat/completions``, ``GET {base_url}/models``). One request per study::

    {"model": <served name>, "max_tokens": <model.max_new_tokens>, "temperature": 0, "n": 1,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},   # prior
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},   # current
         {"type": "text", "text": <the question of inference/prompts.py>}]}]}

The turns are those the local engine builds (inference/transformers_engine.py): each user turn
its images, in the order the worker gives them, then its text; no system role (MedGemma's chat
template has none); a conversation's earlier turns as user/assistant messages. The server
applies the model's own chat template. Temperature 0 is greedy decoding on vLLM, SGLang and TGI.
Images travel as lossless PNG: preprocessing's pixels, shrunk to the model's input side
(``max_image_side``, 896) with area interpolation when larger, as the server would otherwise do.

Batching is the server's job (continuous batching): the node keeps at most
``max_concurrent_requests`` requests in flight, through a fixed pool of that many sender
threads, each with its own httpx client and keep-alive connection; a worker batch's studies are
sent together and the batch ends when the last answer is in. ``prepare`` builds the request
bodies (PNG encoding), so the worker encodes batch N+1 while batch N is in flight.

Identity: ``connect`` asks ``GET {base_url}/models`` for the served model (``id``, ``owned_by``,
``root``, ``created``) and, best effort, the server's own version (``GET /version`` on vLLM and
SGLang, ``GET /info`` on TGI, which also gives the weights' commit). Each answer's ``model`` and
``system_fingerprint`` go into that report's identity: TID 4019 Algorithm Name is the served
model, Algorithm Version its reported version.

Failures, as the engine seam's errors (inference/engine.py):
    connection refused, unknown host, connect timeout    EngineUnavailable: jobs wait, status
    401/403 (API key), 404 (model not served)            says why (a configuration problem must
                                                         not use up every study's attempts)
    429, 5xx (Retry-After honoured), read timeout,       EngineRequestFailed: the job is
    dropped connection, an answer that is not a          retried with backoff
    chat completion
    any other 4xx                                        EngineRequestRejected: fails at once

Never logged: the API key (sent only in the Authorization header), the images, the question.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from config.settings import ModelSettings, OpenAIServerSettings
from core.errors import InferenceError
from inference.demo_model import DEMO_MODEL_ID
from inference.engine import (
    BatchPartlyFailed,
    EngineRequestFailed,
    EngineRequestRejected,
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    JoinError,
    PreparedBatch,
)
from storage.report_schema import ModelIdentity

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 3600.0  # a longer Retry-After is taken as this
MAX_ERROR_DETAIL = 300  # characters of a server's error message kept in a job's error
# HTTP statuses that mean the configuration is wrong, not the request (jobs wait, not fail).
UNAVAILABLE_STATUSES = {
    401: "rejected the API key",
    403: "refused access",
    404: "has no such model or path",
}
_SNAPSHOT_SHA = re.compile(r"snapshots/([0-9a-f]{40})")


# --------------------------------------------------------------------------- request bodies


def fit_to_model(image: Image.Image, max_side: int) -> Image.Image:
    """The image shrunk to at most ``max_side`` a side (0: as is), never enlarged.

    Preprocessed images are squares; the model's processor would resize them to its input
    (896 for MedGemma) on the server. Shrinking here first, with area interpolation as Google's
    DICOM handler does, sends a quarter of the bytes; the server's resize is then a no-op.
    """
    image = image.convert("RGB")
    if max_side <= 0 or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def png_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL (lossless: the model sees our pixels;
    the fastest zlib level, as the bytes go over a LAN once)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _user_content(
    images: Sequence[Image.Image], text: str, max_side: int, question_first: bool = False
) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(fit_to_model(image, max_side))}}
        for image in images
    ]
    question = {"type": "text", "text": text}
    return [question, *content] if question_first else [*content, question]


def chat_messages(request: GenerationRequest, max_side: int = 0) -> list[dict[str, Any]]:
    """The request's turns as chat messages: earlier turns (when the request carries them),
    then the new user turn; Gemma's "model" role is the API's "assistant"."""
    messages: list[dict[str, Any]] = []
    for turn in request.history:
        if turn.role == "model":
            messages.append({"role": "assistant", "content": turn.text})
        else:
            content = _user_content(turn.images, turn.text, max_side, turn.question_first)
            messages.append({"role": "user", "content": content})
    content = _user_content(request.images, request.prompt, max_side, request.question_first)
    messages.append({"role": "user", "content": content})
    return messages


def chat_body(model: str, request: GenerationRequest, max_side: int = 0) -> dict[str, Any]:
    return {
        "model": model,
        "messages": chat_messages(request, max_side),
        "max_tokens": request.settings.max_new_tokens,
        "temperature": 0,  # greedy (docs/architecture.md, "Model facts")
        "n": 1,
        "stream": False,
    }


# --------------------------------------------------------------------------- settings


def read_api_key(settings: OpenAIServerSettings) -> str | None:
    """The API key from ``api_key_file`` or ``api_key_env``; None when neither is set.

    Errors name the file or variable, never the key.
    """
    if settings.api_key_file is not None:
        try:
            key = settings.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise EngineUnavailable(
                f"cannot read model.openai.api_key_file {settings.api_key_file}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        if not key:
            raise EngineUnavailable(f"model.openai.api_key_file {settings.api_key_file} is empty")
        return key
    if settings.api_key_env is not None:
        key = os.environ.get(settings.api_key_env, "").strip()
        if not key:
            raise EngineUnavailable(
                f"the environment variable {settings.api_key_env} (model.openai.api_key_env) "
                "is not set"
            )
        return key
    return None


def ssl_context(settings: OpenAIServerSettings) -> ssl.SSLContext:
    """TLS 1.2 or newer (BCP 195); the server verified against ``ca_file`` (else the system
    CAs) and its host name; our certificate presented when ``cert_file``/``key_file`` are set."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def _server_root(base_url: str) -> str:
    """The server's own address: the base URL without its API path (``/v1``)."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


# --------------------------------------------------------------------------- answers


def retry_after_seconds(value: str | None) -> float | None:
    """RFC 9110 §10.2.3 Retry-After as seconds: delay-seconds or an HTTP-date; capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER_S)


def _error_detail(response: httpx.Response) -> str:
    """The server's error message (OpenAI ``{"error": {"message"}}``, vLLM/TGI variants)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:MAX_ERROR_DETAIL].strip()
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if message is None and isinstance(data, dict):
        message = data.get("message") or data.get("detail")
    return str(message if message is not None else data)[:MAX_ERROR_DETAIL]


@dataclass
class _Answer:
    text: str
    prompt_tokens: int
    new_tokens: int
    model: str
    system_fingerprint: str | None


def _token_count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return int(value) if isinstance(value, int) and value >= 0 else 0


def _first_choice_text(data: Any) -> str | None:
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    return text if isinstance(text, str) else None


def parse_chat_completion(response: httpx.Response) -> _Answer:
    """The first choice of a chat completion; EngineRequestFailed when it is not one."""
    try:
        data = response.json()
    except ValueError:
        raise EngineRequestFailed(
            f"the inference server answered HTTP {response.status_code} with "
            f"{len(response.content)} bytes that are not JSON "
            f"({response.headers.get('content-type', 'no content type')})"
        ) from None
    text = _first_choice_text(data)
    if not isinstance(data, dict) or text is None:
        raise EngineRequestFailed(
            "the inference server's answer is not a chat completion "
            "(no choices[0].message.content text)"
        )
    usage = data.get("usage")
    fingerprint = data.get("system_fingerprint")
    return _Answer(
        text=text,
        prompt_tokens=_token_count(usage, "prompt_tokens"),
        new_tokens=_token_count(usage, "completion_tokens"),
        model=str(data.get("model") or ""),
        system_fingerprint=str(fingerprint) if fingerprint else None,
    )


# --------------------------------------------------------------------------- identity


def choose_model(listing: Any, wanted: str | None, base_url: str) -> dict[str, Any]:
    """The ``/models`` entry of the configured model, or the only one served."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries
    ):
        raise EngineUnavailable(f"{base_url}/models is not an OpenAI model list")
    served = [str(e["id"]) for e in entries]
    if wanted is not None:
        for entry in entries:
            if entry["id"] == wanted:
                return dict(entry)
        raise EngineUnavailable(
            f"the inference server at {base_url} does not serve model.openai.model = "
            f"{wanted!r} (it serves: {', '.join(served) or 'nothing'})"
        )
    if len(entries) != 1:
        raise EngineUnavailable(
            f"the inference server at {base_url} serves {len(entries)} models "
            f"({', '.join(served) or 'none'}): set model.openai.model to one of them"
        )
    return dict(entries[0])


def _revision(entry: dict[str, Any], info: dict[str, str]) -> str:
    """The model's version as the server reports it: the weights' commit (TGI ``model_sha``, or
    a Hugging Face cache snapshot in vLLM's ``root``), else ``root`` when it names more than the
    served name, else unknown."""
    if info.get("model_sha"):
        return info["model_sha"]
    root = str(entry.get("root") or "")
    if match := _SNAPSHOT_SHA.search(root):
        return match.group(1)
    return root if root and root != entry["id"] else "unknown"


def server_identity(base_url: str, entry: dict[str, Any], info: dict[str, str]) -> ModelIdentity:
    model_id = str(entry["id"])
    server = {"base_url": base_url}
    for key in ("owned_by", "root", "created"):
        if entry.get(key) not in (None, ""):
            server[key] = str(entry[key])
    server.update({k: v for k, v in info.items() if k in ("name", "version")})
    software = info.get("name") or str(entry.get("owned_by") or "server")
    versions = {"httpx": httpx.__version__}
    if info.get("version"):
        versions[software] = info["version"]
    return ModelIdentity(
        model_id=model_id,
        revision=_revision(entry, info),
        dtype="as served",
        quantization="as served",
        device=f"inference server {base_url}",
        library_versions=versions,
        is_test_model=model_id == DEMO_MODEL_ID,
        server=server,
    )


def answer_identity(identity: ModelIdentity, answer: _Answer) -> ModelIdentity:
    """The engine's identity, with what this answer says of itself (its model, fingerprint)."""
    if not answer.system_fingerprint and answer.model in ("", identity.model_id):
        return identity
    server = dict(identity.server)
    update: dict[str, Any] = {"server": server}
    if answer.model and answer.model != identity.model_id:
        update["model_id"] = answer.model
        update["is_test_model"] = identity.is_test_model or answer.model == DEMO_MODEL_ID
    if answer.system_fingerprint:
        server["system_fingerprint"] = answer.system_fingerprint
        update["revision"] = answer.system_fingerprint
    return identity.model_copy(update=update)


# --------------------------------------------------------------------------- engine


class OpenAIEngine:
    """``PreparingEngine`` over an OpenAI-compatible chat completions server.

    ``connect()`` must succeed before the first batch (inference/loader.py calls it, and again
    after ``unavailable_reason`` was set, until the server answers).
    """

    def __init__(self, settings: ModelSettings) -> None:
        server = settings.openai
        if server.base_url is None:
            raise EngineUnavailable("model.engine = 'openai' needs model.openai.base_url")
        self.settings = server
        self.base_url = server.base_url
        self.identity = ModelIdentity(model_id=server.model or "unknown", device=self.base_url)
        self.served_model: str | None = None
        # Set when a request found the server unreachable; cleared by connect().
        self.unavailable_reason: str | None = None
        self._headers: dict[str, str] = {}
        self._timeout = httpx.Timeout(
            connect=server.connect_timeout_s,
            read=server.read_timeout_s,
            write=server.read_timeout_s,
            pool=server.connect_timeout_s,
        )
        self._verify: ssl.SSLContext | bool = True  # https: the context connect() builds
        self._senders = ThreadPoolExecutor(
            max_workers=server.max_concurrent_requests, thread_name_prefix="openai-sender"
        )
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self._timeout,
            verify=self._verify,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            headers={"User-Agent": "medgemma-node"},
        )

    def _client(self) -> httpx.Client:
        """This sender thread's client (one keep-alive connection per thread)."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def connect(self) -> None:
        """Read the API key, ask the server for its model and version; raise
        EngineUnavailable (saying why, without the key) when it cannot be used."""
        key = read_api_key(self.settings)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        if self.base_url.startswith("https:"):
            self._verify = self._tls_context()
        with self._new_client() as client:
            listing = self._get_json(client, f"{self.base_url}/models", required=True)
            entry = choose_model(listing, self.settings.model, self.base_url)
            info = self._server_info(client)
        self.served_model = str(entry["id"])
        self.identity = server_identity(self.base_url, entry, info)
        self.unavailable_reason = None
        log.info(
            "inference server %s serves %s (revision %s)",
            self.base_url,
            self.identity.model_id,
            self.identity.revision,
        )

    def _tls_context(self) -> ssl.SSLContext:
        try:
            return ssl_context(self.settings)
        except (OSError, ssl.SSLError) as exc:
            raise EngineUnavailable(
                "cannot use the TLS files of model.openai (ca_file, cert_file, key_file): "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def _get_json(self, client: httpx.Client, url: str, required: bool) -> Any:
        try:
            response = client.get(url, headers=self._headers)
        except httpx.HTTPError as exc:
            if not required:
                return None
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            if not required:
                return None
            raise self._status_error(response)
        try:
            return response.json()
        except ValueError:
            if not required:
                return None
            raise EngineUnavailable(f"{url} did not answer JSON") from None

    def _server_info(self, client: httpx.Client) -> dict[str, str]:
        """The server software's version (vLLM/SGLang ``/version``, TGI ``/info``), if told."""
        root = _server_root(self.base_url)
        version = self._get_json(client, f"{root}/version", required=False)
        if isinstance(version, dict) and version.get("version"):
            return {"version": str(version["version"])}
        info = self._get_json(client, f"{root}/info", required=False)
        if isinstance(info, dict) and info.get("version"):
            found = {"name": "tgi", "version": str(info["version"])}
            if info.get("model_sha"):
                found["model_sha"] = str(info["model_sha"])
            return found
        return {}

    def _unreachable(self, exc: httpx.HTTPError) -> EngineUnavailable:
        return EngineUnavailable(
            f"the inference server at {self.base_url} cannot be reached "
            f"({type(exc).__name__}: {exc}). Studies are received and stored and their jobs "
            f"wait until it answers (tried again every {self.settings.check_interval_s:g} s)."
        )

    def _status_error(self, response: httpx.Response) -> InferenceError:
        """An HTTP error status as the seam's error (module docstring: which is which)."""
        status = response.status_code
        detail = _error_detail(response)
        where = f"the inference server at {self.base_url}"
        if status in UNAVAILABLE_STATUSES:
            return EngineUnavailable(
                f"{where} {UNAVAILABLE_STATUSES[status]} (HTTP {status}: {detail}); jobs wait "
                "until model.openai is corrected"
            )
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        if status == 429 or status >= 500:
            busy = "is busy" if status == 429 else "failed"
            return EngineRequestFailed(f"{where} {busy} (HTTP {status}: {detail})", retry_after)
        return EngineRequestRejected(f"{where} refused the request (HTTP {status}: {detail})")

    def close(self) -> None:
        self._senders.shutdown(wait=True)
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    # -- generation ----------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        return self.generate_prepared(self.prepare(requests))

    def prepare(self, requests: list[GenerationRequest]) -> PreparedBatch:
        """The request bodies (images encoded as PNG data URLs); safe in a second thread."""
        started = time.perf_counter()
        model = self.served_model or self.settings.model or "unknown"
        side = self.settings.max_image_side
        bodies = [chat_body(model, request, side) for request in requests]
        return PreparedBatch(list(requests), bodies, time.perf_counter() - started)

    def join(self, pieces: list[PreparedBatch]) -> PreparedBatch:
        """One batch of ``prepare``d pieces: their request bodies in order (each request is
        sent on its own, so joining is putting the lists together)."""
        requests: list[GenerationRequest] = []
        bodies: list[dict[str, Any]] = []
        for piece in pieces:
            if not isinstance(piece.inputs, list) or len(piece.inputs) != len(piece.requests):
                raise JoinError("a piece not prepared by OpenAIEngine.prepare")
            requests += piece.requests
            bodies += piece.inputs
        return PreparedBatch(requests, bodies, sum(piece.seconds for piece in pieces))

    def generate_prepared(self, batch: PreparedBatch) -> list[GenerationResult]:
        """Send every request of the batch, at most max_concurrent_requests at a time."""
        if not batch.requests:
            return []
        started = time.perf_counter()
        outcomes = list(self._senders.map(self._send, batch.inputs))
        seconds = batch.seconds + time.perf_counter() - started
        results: list[GenerationResult | InferenceError] = [
            o if isinstance(o, InferenceError) else self._result(o, seconds, len(outcomes))
            for o in outcomes
        ]
        return self._all_or_raise(results)

    def _result(self, answer: _Answer, seconds: float, batch_size: int) -> GenerationResult:
        return GenerationResult(
            text=answer.text,
            prompt_tokens=answer.prompt_tokens,
            new_tokens=answer.new_tokens,
            seconds=seconds,
            batch_size=batch_size,
            identity=answer_identity(self.identity, answer),
        )

    def _all_or_raise(
        self, outcomes: list[GenerationResult | InferenceError]
    ) -> list[GenerationResult]:
        errors = [o for o in outcomes if isinstance(o, InferenceError)]
        if not errors:
            return [o for o in outcomes if isinstance(o, GenerationResult)]
        lost = [e for e in errors if isinstance(e, EngineUnavailable)]
        if lost:
            self.unavailable_reason = str(lost[0])
            log.warning("%s", lost[0])
        if len(outcomes) == 1 or len(lost) == len(outcomes):
            raise errors[0]
        raise BatchPartlyFailed(outcomes)

    def _send(self, body: dict[str, Any]) -> _Answer | InferenceError:
        """One chat completion; failures returned (not raised) so the batch's others count."""
        try:
            response = self._client().post(
                f"{self.base_url}/chat/completions", json=body, headers=self._headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return self._unreachable(exc)
        except httpx.TimeoutException as exc:
            return EngineRequestFailed(
                f"no answer from the inference server at {self.base_url} within "
                f"{self.settings.read_timeout_s:g} s ({type(exc).__name__})"
            )
        except httpx.HTTPError as exc:
            return EngineRequestFailed(
                f"the exchange with the inference server at {self.base_url} failed "
                f"({type(exc).__name__}: {exc})"
            )
        if response.status_code != 200:
            return self._status_error(response)
        try:
            return parse_chat_completion(response)
        except EngineRequestFailed as exc:
            return exc
