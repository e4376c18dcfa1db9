"""Reading the receiver's acknowledgment (HL7 v2.5 §2.9.2 original mode, §2.9.3 enhanced mode).

An ACK is accepted when it is an ER7 message (MSH first; CR, LF or CRLF between segments)
with an MSA segment (§2.15.8) whose MSA-1 is in HL7 table 0008. Anything else is garbage and
raises AckParseError. MSA-3 and ERR (§2.15.5) are read for the human-readable reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import hl7

from core.errors import HL7Error

_MIN_HEADER_LENGTH = 8  # "MSH" + field separator + four encoding characters


class AckParseError(HL7Error, ValueError):
    """The bytes received are not a readable HL7 acknowledgment."""


class AckCode(StrEnum):
    """HL7 table 0008 acknowledgment codes (MSA-1)."""

    APPLICATION_ACCEPT = "AA"
    APPLICATION_ERROR = "AE"
    APPLICATION_REJECT = "AR"
    COMMIT_ACCEPT = "CA"
    COMMIT_ERROR = "CE"
    COMMIT_REJECT = "CR"

    @property
    def accepted(self) -> bool:
        return self in (AckCode.APPLICATION_ACCEPT, AckCode.COMMIT_ACCEPT)

    @property
    def rejected(self) -> bool:
        return self in (AckCode.APPLICATION_REJECT, AckCode.COMMIT_REJECT)


@dataclass(frozen=True)
class Acknowledgment:
    """The parts of an ACK that decide what happens to the message sent."""

    code: AckCode  # MSA-1
    control_id: str  # MSA-2: the MSH-10 of the message acknowledged
    text: str = ""  # MSA-3 text message, unescaped
    errors: tuple[str, ...] = ()  # one description per ERR segment

    @property
    def reason(self) -> str:
        """``code``, then MSA-3 and the ERR descriptions, for logs and dead letters."""
        details = [part for part in (self.text, *self.errors) if part]
        return f"{self.code.value}: {'; '.join(details)}" if details else self.code.value


def parse_ack(payload: bytes | str) -> Acknowledgment:
    """Parse an ACK frame's content; raise AckParseError for anything that is not one."""
    message = _parse_er7(_decode(payload) if isinstance(payload, bytes) else payload)
    try:
        msa = message.segment("MSA")
    except KeyError as exc:
        raise AckParseError("the reply has no MSA segment") from exc
    code_text = _field(message, msa, 1).strip().upper()
    try:
        code = AckCode(code_text)
    except ValueError as exc:
        raise AckParseError(f"MSA-1 {code_text!r} is not an HL7 table 0008 code") from exc
    return Acknowledgment(
        code=code,
        control_id=_field(message, msa, 2).strip(),
        text=message.unescape(_field(message, msa, 3)).strip(),
        errors=tuple(_error_description(message, err) for err in _segments(message, "ERR")),
    )


def _decode(payload: bytes) -> str:
    """UTF-8 (what MSH-18 of our messages announces), else ISO 8859-1, which never fails."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("latin-1")


def _parse_er7(text: str) -> hl7.Message:
    normalized = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 \t")
    if not normalized.startswith("MSH") or len(normalized) < _MIN_HEADER_LENGTH:
        raise AckParseError("the reply does not start with an MSH segment")
    try:
        return hl7.parse(normalized)
    except Exception as exc:  # the hl7 package raises several types for malformed input
        raise AckParseError(f"the reply is not valid ER7: {exc}") from exc


def _segments(message: hl7.Message, segment_id: str) -> list[hl7.Segment]:
    try:
        return list(message.segments(segment_id))
    except KeyError:
        return []


def _field(message: hl7.Message, segment: hl7.Segment, index: int) -> str:
    """The field's ER7 text (first repetition), "" when the segment is shorter."""
    try:
        text = str(segment(index))
    except IndexError:
        return ""
    return text.split(message.separators[2])[0]


def _components(message: hl7.Message, segment: hl7.Segment, index: int) -> list[str]:
    return _field(message, segment, index).split(message.separators[3])


def _error_description(message: hl7.Message, err: hl7.Segment) -> str:
    """ERR (§2.15.5): ERR-2 location, ERR-3 code and text, ERR-8 user message, ERR-7
    diagnostics; ERR-1 (the pre-2.5 code and location) when those are all empty."""
    location = _components(message, err, 2)
    error_code = _components(message, err, 3)
    parts = [
        "-".join(part for part in (location[0], location[2] if len(location) > 2 else "") if part),
        " ".join(error_code[:2]).strip(),
        _field(message, err, 8),
        _field(message, err, 7),
    ]
    if not any(parts):
        legacy = _field(message, err, 1)
        parts = [legacy.replace(message.separators[3], " ").replace(message.separators[4], " ")]
    return message.unescape(" ".join(part for part in parts if part).strip())
