"""One router per resource: health, studies, admin (jobs and outbox)."""
