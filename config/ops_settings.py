"""Settings for running for years unattended: ``[retention]`` and ``[audit]`` (imported into
config/settings.py's NodeSettings), and the fingerprint of a configuration."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from config.section import Section


class RetentionSettings(Section):
    """What the node keeps, and for how long, once a study's results have been delivered.

    A study is *settled* when no job of it is queued, running or failed, none of its
    deliveries is pending or dead, no conversation about it is open and no instance waits in a
    quiet period; its settle time is its newest report, delivery or job end.
    """

    enabled: bool = True
    # Received instances are deleted this many days after their study settled (0: keep).
    instances_days: float = Field(default=30.0, ge=0)
    # Report objects (SR, GSPS, PDF, ORU, JSON under <data>/reports/) likewise (0: keep).
    # The report rows (text, findings) and the audit trail stay in the database.
    outputs_days: float = Field(default=365.0, ge=0)
    # When free disk falls below this, the oldest settled studies are pruned at once, whatever
    # their age, until it is free again; must be above storage.min_free_disk_mb (the C-STORE
    # watermark). 0: twice the watermark.
    free_space_target_mb: int = Field(default=0, ge=0)
    check_interval_s: float = Field(default=300.0, gt=0)


class SyslogSettings(Section):
    """Forwarding of the audit trail as DICOM audit messages (PS3.15 A.5, the IHE ATNA
    format) over syslog (RFC 5424; UDP RFC 5426, TCP RFC 6587 octet counting, TLS RFC 5425)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=6514, ge=1, le=65535)
    transport: Literal["udp", "tcp", "tls"] = "tls"
    # For transport "tls": ca_file to verify the collector (else the system's CAs);
    # cert_file/key_file for a client certificate (ATNA's mutual node authentication).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    app_name: str = Field(default="medgemma-node", min_length=1, max_length=48)
    # The AuditEnterpriseSiteID of each message (e.g. the hospital's name or OID).
    enterprise_site_id: str = ""
    kinds: list[str] = Field(default_factory=list)  # only these kinds (empty: every kind)
    poll_interval_s: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=200, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _client_certificate(self) -> SyslogSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class AuditSettings(Section):
    syslog: SyslogSettings = Field(default_factory=SyslogSettings)


def settings_fingerprint(settings: BaseModel) -> str:
    """SHA-256 of the effective settings (as JSON): the same configuration gives the same
    fingerprint, so the audit trail shows when it changed without quoting any secret."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
