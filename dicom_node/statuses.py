"""Words for the codes DICOM peers exchange, for logs and the command line.

A-ASSOCIATE-RJ result, source and reason: PS3.8 §9.3.4 (Table 9-21).
DIMSE status of a C-STORE response: PS3.4 Annex B.2.3 (Table B.2-1), and the general statuses
of PS3.7 Annex C that any DIMSE response may carry.
"""

from __future__ import annotations

REJECT_RESULTS = {1: "rejected permanently", 2: "rejected transiently"}
REJECT_SOURCES = {
    1: "service user (the called application)",
    2: "service provider (ACSE)",
    3: "service provider (presentation)",
}
# Reasons by source; values not listed are reserved.
REJECT_REASONS = {
    1: {
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AE title not recognised",
        7: "called AE title not recognised",
    },
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}

# PS3.7 Annex C general statuses, then the C-STORE ranges of PS3.4 Table B.2-1.
EXACT_STATUSES = {
    0x0000: "Success",
    0x0107: "Warning: Attribute list error",
    0x0110: "Failure: Processing failure",
    0x0111: "Failure: Duplicate SOP Instance",
    0x0117: "Failure: Invalid SOP Instance",
    0x0122: "Refused: SOP Class not supported",
    0x0124: "Refused: Not authorized",
    0x0210: "Failure: Duplicate invocation",
    0x0211: "Failure: Unrecognized operation",
    0x0212: "Failure: Mistyped argument",
    0x0213: "Failure: Resource limitation",
    0xB000: "Warning: Coercion of Data Elements",
    0xB006: "Warning: Elements Discarded",
    0xB007: "Warning: Data Set does not match SOP Class",
}
STATUS_RANGES = {
    0xA700: "Refused: Out of Resources",
    0xA900: "Error: Data Set does not match SOP Class",
}


def describe_rejection(result: int | None, source: int | None, reason: int | None) -> str:
    """E.g. 'rejected permanently by the service user (the called application): called AE
    title not recognised (result 1, source 1, reason 7)'."""
    result_text = REJECT_RESULTS.get(result or 0, "rejected")
    source_text = REJECT_SOURCES.get(source or 0, "an unknown source")
    reason_text = REJECT_REASONS.get(source or 0, {}).get(reason or 0, "reserved reason")
    codes = f"result {result}, source {source}, reason {reason}"
    return f"{result_text} by the {source_text}: {reason_text} ({codes})"


def status_meaning(status: int) -> str:
    """What a C-STORE or C-ECHO response status means."""
    if status in EXACT_STATUSES:
        return EXACT_STATUSES[status]
    if status & 0xFF00 in STATUS_RANGES:
        return STATUS_RANGES[status & 0xFF00]
    if status & 0xF000 == 0xC000:
        return "Error: Cannot understand"
    if status & 0xF000 == 0xB000:
        return "Warning"
    return "unknown status"


def describe_status(status: int | None, error_comment: str = "") -> str:
    """E.g. '0xA900 Error: Data Set does not match SOP Class (pixel data too short)'."""
    if status is None:
        return "no response (timeout or abort)"
    text = f"0x{status:04X} {status_meaning(status)}"
    return f"{text} ({error_comment})" if error_comment else text
