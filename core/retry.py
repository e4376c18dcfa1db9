"""One retry policy for everything the node retries (jobs, deliveries).

    policy = RetryPolicy(max_attempts=20, max_age_s=86400, initial_backoff_s=2, max_backoff_s=600)
    when = policy.next_attempt(attempts=3, first_at=row.created_at, now=utcnow())
    if when is None: ...give up (dead letter / failed)

The delay after attempt n is ``initial_backoff_s * 2**(n-1)``, capped at ``max_backoff_s``,
at least a peer's Retry-After (itself capped), then spread by ``jitter`` (a fraction: 0.1 =
up to 10% longer) so many rows failing together do not all come back in the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    max_age_s: float | None = None  # None: no age limit
    initial_backoff_s: float = 30.0
    max_backoff_s: float | None = None  # None: no cap
    jitter: float = 0.0

    def delay(self, attempts: int, retry_after_s: float | None = None) -> timedelta:
        """The wait after ``attempts`` failed attempts (1 = the first)."""
        exponent = min(max(attempts - 1, 0), 60)
        seconds = self.initial_backoff_s * 2.0**exponent
        if self.max_backoff_s is not None:
            seconds = min(seconds, self.max_backoff_s)
        if retry_after_s is not None:
            cap = self.max_backoff_s if self.max_backoff_s is not None else retry_after_s
            seconds = max(seconds, min(retry_after_s, cap))
        if self.jitter > 0:
            seconds *= 1.0 + random.uniform(0.0, self.jitter)
        return timedelta(seconds=seconds)

    def gives_up(self, attempts: int, first_at: datetime, now: datetime) -> bool:
        if attempts >= self.max_attempts:
            return True
        return self.max_age_s is not None and (now - first_at).total_seconds() >= self.max_age_s

    def next_attempt(
        self,
        attempts: int,
        first_at: datetime,
        now: datetime,
        retry_after_s: float | None = None,
    ) -> datetime | None:
        """When to try again after ``attempts`` failed attempts, or None to give up."""
        if self.gives_up(attempts, first_at, now):
            return None
        return now + self.delay(attempts, retry_after_s)

    def give_up_reason(self, attempts: int) -> str:
        if attempts >= self.max_attempts:
            return f"gave up after {attempts} attempts"
        return f"gave up: older than {self.max_age_s:g} s"
