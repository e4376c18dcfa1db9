"""The HTTP destination's sender: each report's JSON document POSTed to a URL.

    sender = HttpSender(destination)                   # httpx transport injectable for tests
    outcomes = sender.send(parcels)                    # storage.delivery_types

The body is the JSON written with the report, sent as it is; the ``Idempotency-Key`` header is
the row's message_id (storage.outbox.idempotency_key), so a receiver can drop a re-send.
Statuses (RFC 9110 §15): 2xx delivered; 408 and 429 retried, after Retry-After when given
(§10.2.3); any other 4xx rejected; 5xx, 3xx (redirects are not followed) and no answer at all
retried with the destination taken as down.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.utils import parsedate_to_datetime

import httpx

from config.settings import HttpDestination
from storage.delivery_types import DeliveryOutcome, Parcel, send_each
from storage.models import utcnow


class HttpSender:
    """The delivery Sender of one HTTP destination."""

    def __init__(
        self, destination: HttpDestination, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.destination = destination
        self.transport = transport

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]:
        with httpx.Client(
            timeout=self.destination.timeout_s, transport=self.transport, follow_redirects=False
        ) as client:
            return send_each(parcels, lambda parcel: self._post(client, parcel))

    def _post(self, client: httpx.Client, parcel: Parcel) -> DeliveryOutcome:
        headers = request_headers(self.destination, parcel.item.message_id)
        try:
            response = client.post(
                self.destination.url, content=parcel.path.read_bytes(), headers=headers
            )
        except httpx.HTTPError as exc:
            return DeliveryOutcome.retry(
                f"HTTP request failed: {exc}", type(exc).__name__, destination_down=True
            )
        return http_outcome(response)


def request_headers(destination: HttpDestination, message_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **destination.headers}
    if destination.bearer_token:
        headers["Authorization"] = f"Bearer {destination.bearer_token}"
    headers["Idempotency-Key"] = message_id
    return headers


def http_outcome(response: httpx.Response) -> DeliveryOutcome:
    status = response.status_code
    code = f"HTTP {status}"
    if 200 <= status < 300:
        return DeliveryOutcome.delivered("", code)
    reason = f"{code}: {response.text[:500]}".strip()
    if 400 <= status < 500 and status not in (408, 429):
        return DeliveryOutcome.rejected(reason, code)
    return DeliveryOutcome.retry(
        reason, code, destination_down=True, retry_after_s=retry_after_seconds(response)
    )


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max((parsedate_to_datetime(value) - utcnow()).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None
