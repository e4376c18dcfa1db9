"""SSL contexts from the TLS settings, for DICOM (PS3.15 Annex B.9) and MLLP alike.

BCP 195: TLS 1.2 or newer. Outgoing connections verify the peer against ``ca_file`` (else the
system CAs) and its host name, and present our certificate when ``cert_file`` and ``key_file``
are set; the listener asks for client certificates, requiring them if configured.
"""

from __future__ import annotations

import ssl

from config.settings import TLSSettings


def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """For an outgoing association or MLLP connection; None when TLS is off."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """For the DICOM listener; None when TLS is off. Client certificates optional or required."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file is not None and tls.key_file is not None  # checked by TLSSettings
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is None:
        context.verify_mode = ssl.CERT_NONE
        return context
    context.load_verify_locations(tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context
