"""An HL7 v2 message composed as ER7 text, segment by segment (HL7 v2.5 §2.5-2.7).

    message = Er7Message()
    pid = message.add_segment("PID")
    pid[3] = join_components(escape_text(value), "", "", authority)   # PID-3
    text = message.to_er7()          # segments in the order added, each ended by CR

Values are given as they go on the wire: escaped (hl7_out.encoding.escape_text), components
and repetitions already joined. Trailing empty fields are not sent (§2.5.3). Segments are
written in the order they are added, so the caller adds them in the message structure's order
(groups are implied by that order; the receiver, like hl7apy's parser with ``find_groups``,
finds them again).

Nothing here validates: ``hl7_out.oru.build_oru`` parses the text back with hl7apy at STRICT
validation (every field's datatype and length) and validates the parsed message (structure,
required fields). Composing through hl7apy's element tree as well cost as much again as that
parse, most of a message's time: 256 ORUs for a batch of 256 are on the report tail of every
burst (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from hl7_out.encoding import ENCODING_CHARACTERS, FIELD_SEPARATOR

SEGMENT_TERMINATOR = "\r"  # §2.5.1
_HEADER = "MSH"  # MSH-1 is the field separator itself and MSH-2 the encoding characters


class Er7Segment:
    """One segment's fields by number (PID-3 is ``segment[3]``)."""

    def __init__(self, name: str) -> None:
        if len(name) != 3 or not name.isalnum():
            raise ValueError(f"segment name {name!r} is not three letters or digits")
        self.name = name
        self._fields: dict[int, str] = {}

    @property
    def _first(self) -> int:
        """The first field written after the name: MSH-1 and MSH-2 are the delimiters."""
        return 3 if self.name == _HEADER else 1

    def __setitem__(self, number: int, value: str) -> None:
        if number < self._first:
            raise ValueError(f"{self.name}-{number} is not a field that can be set")
        self._fields[number] = value

    def __getitem__(self, number: int) -> str:
        return self._fields.get(number, "")

    def to_er7(self) -> str:
        last = max((number for number, value in self._fields.items() if value), default=0)
        values = [self[number] for number in range(self._first, last + 1)]
        head = [self.name, ENCODING_CHARACTERS] if self.name == _HEADER else [self.name]
        return FIELD_SEPARATOR.join([*head, *values])


class Er7Message:
    """Segments in the order added."""

    def __init__(self) -> None:
        self.segments: list[Er7Segment] = []

    def add_segment(self, name: str) -> Er7Segment:
        segment = Er7Segment(name)
        self.segments.append(segment)
        return segment

    def to_er7(self) -> str:
        return "".join(segment.to_er7() + SEGMENT_TERMINATOR for segment in self.segments)
