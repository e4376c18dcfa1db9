"""ER7 text encoding for the node's HL7 v2.5 messages.

HL7 v2.5 §2.5.4 message delimiters: the node always sends ``|`` as field separator and ``^~\\&``
as encoding characters (MSH-1, MSH-2). Text that may contain those characters is escaped with
the §2.7.4 special character sequences before it is handed to hl7apy, which then passes the
sequences through unchanged.
"""

from __future__ import annotations

import re
from datetime import datetime

FIELD_SEPARATOR = "|"
COMPONENT_SEPARATOR = "^"
REPETITION_SEPARATOR = "~"
ESCAPE_CHARACTER = "\\"
SUBCOMPONENT_SEPARATOR = "&"
ENCODING_CHARACTERS = (
    COMPONENT_SEPARATOR + REPETITION_SEPARATOR + ESCAPE_CHARACTER + SUBCOMPONENT_SEPARATOR
)

# §2.7.4: \F\ field, \S\ component, \T\ subcomponent, \R\ repetition, \E\ escape character.
_ESCAPE_SEQUENCES = {
    ESCAPE_CHARACTER: "\\E\\",
    FIELD_SEPARATOR: "\\F\\",
    COMPONENT_SEPARATOR: "\\S\\",
    SUBCOMPONENT_SEPARATOR: "\\T\\",
    REPETITION_SEPARATOR: "\\R\\",
}
_UNESCAPE_SEQUENCES = {sequence[1]: char for char, sequence in _ESCAPE_SEQUENCES.items()}

# C0 controls (and DEL) other than TAB would end a segment (CR), break the MLLP frame (VT, FS)
# or be rejected by receivers; text fields never carry them.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ESCAPE_SEQUENCE = re.compile(r"\\([EFSTR])\\")


def escape_text(text: str) -> str:
    """Escape one text value for an ER7 field, component or subcomponent (HL7 v2.5 §2.7.4).

    Every delimiter is replaced in a single pass, so the escape character is escaped exactly
    once and the sequences produced for the other delimiters are never escaped again. Control
    characters (CR, LF, VT, FS, ...) become a space: a text value is always one line.
    """
    single_line = _CONTROL_CHARACTERS.sub(" ", text)
    return "".join(_ESCAPE_SEQUENCES.get(char, char) for char in single_line)


def escaped_length(text: str) -> int:
    """Length of ``escape_text(text)`` without building it."""
    return sum(3 if char in _ESCAPE_SEQUENCES else 1 for char in text)


def fit_escaped(text: str, max_escaped_length: int) -> str:
    """``escape_text`` of the longest start of ``text`` whose escaped form fits the limit:
    a value cut to its field's length never ends in half an escape sequence."""
    single_line = _CONTROL_CHARACTERS.sub(" ", text)
    length = 0
    for end, char in enumerate(single_line):
        length += escaped_length(char)
        if length > max_escaped_length:
            return escape_text(single_line[:end])
    return escape_text(single_line)


def unescape_text(text: str) -> str:
    """Undo the §2.7.4 special character sequences (``\\E\\ \\F\\ \\S\\ \\T\\ \\R\\``).

    Other escape sequences (formatting, highlighting, hex) are left as they are.
    """
    return _ESCAPE_SEQUENCE.sub(lambda match: _UNESCAPE_SEQUENCES[match.group(1)], text)


def join_components(*components: str, separator: str = COMPONENT_SEPARATOR) -> str:
    """Join already-escaped components (or subcomponents), dropping empty trailing ones.

    HL7 v2.5 §2.5.3: trailing empty components are not sent.
    """
    parts = list(components)
    while parts and not parts[-1]:
        parts.pop()
    return separator.join(parts)


def format_dtm(value: datetime) -> str:
    """HL7 v2.5 §2.A.22 DTM to the second: ``YYYYMMDDHHMMSS[+/-ZZZZ]``.

    The offset is sent when ``value`` is timezone-aware; a naive value is sent as local time
    without offset, as §2.A.22 allows.
    """
    text = value.strftime("%Y%m%d%H%M%S")
    if value.utcoffset() is not None:
        text += value.strftime("%z")
    return text
