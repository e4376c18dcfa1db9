"""A C-STORE data set as received: its elements parsed without copying the pixel data, and
the bytes written to disk as they came.

A chest CR is 7.2 MB, nearly all of it Pixel Data. ``event.dataset`` (pynetdicom) reads every
value into memory, the pixels too, and ``event.encoded_dataset()`` joins the preamble, file meta
and a copy of the received stream into one more copy before it is written: two copies of every
image per C-STORE, in the process that receives every association. Here:

* ``parse_received`` reads the elements before (7FE0,0010) Pixel Data, notes the Pixel Data
  length from its header (PS3.5 7.1.2: the 32-bit length of OB/OW), skips the value, and
  reads the elements after it (trailing padding, private groups above 7FE0); every element is
  still parsed, so a malformed data set is refused at once. Encapsulated (undefined length) and
  deflated data sets, whose pixel data is smaller or must be inflated anyway, are decoded in
  full as before;
* ``received_file`` is the Part 10 file as chunks: the preamble, "DICM" and file meta (PS3.10
  7.1), then a view of the received stream, written by ``write_durably`` without joining them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import cast

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta

PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class ParsedDataSet:
    """The received elements (the Pixel Data element left out when ``pixel_bytes`` is set)."""

    dataset: Dataset
    pixel_bytes: int | None  # the Pixel Data value's length, read from its header


def _stream(event: evt.Event) -> BytesIO:
    request = cast(C_STORE, event.request)
    return cast(BytesIO, request.DataSet)


def parse_received(event: evt.Event) -> ParsedDataSet:
    """Every element of the received data set; the pixel value is skipped, not read."""
    syntax = UID(str(event.context.transfer_syntax))
    stream = _stream(event)
    if syntax.is_deflated:
        return ParsedDataSet(event.dataset, None)
    found: list[tuple[str | None, int]] = []

    def at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag != PIXEL_DATA:
            return False
        found.append((vr, length))
        return True

    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    try:
        stream.seek(0)
        dataset = read_dataset(stream, implicit, little, stop_when=at_pixel_data)
        if not found:
            return ParsedDataSet(dataset, None)
        vr, length = found[0]
        if length == UNDEFINED_LENGTH:
            return ParsedDataSet(event.dataset, None)
        header = 12 if not implicit and vr in EXPLICIT_VR_LENGTH_32 else 8
        stream.seek(stream.tell() + header + length)
        _add_trailing(dataset, read_dataset(stream, implicit, little))
    finally:
        stream.seek(0)
    return ParsedDataSet(dataset, length)


def _add_trailing(dataset: Dataset, trailing: Dataset) -> None:
    """The elements after Pixel Data, still raw: they decode in ``dataset``'s character set."""
    tags = list(trailing.keys())  # iterating a Dataset would convert its elements
    for tag in tags:
        dataset[tag] = trailing.get_item(tag)


def file_meta_prefix(event: evt.Event) -> bytes:
    """Preamble, "DICM" and the encoded File Meta Information (PS3.10 7.1)."""
    return b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)


@contextmanager
def received_file(event: evt.Event) -> Iterator[list[bytes | memoryview]]:
    """The Part 10 file as chunks; the data set chunk is a view of the received stream, valid
    only inside the ``with``."""
    view = _stream(event).getbuffer()
    try:
        yield [file_meta_prefix(event), view]
    finally:
        view.release()


def chunks_size(chunks: list[bytes | memoryview]) -> int:
    return sum(len(chunk) for chunk in chunks)
