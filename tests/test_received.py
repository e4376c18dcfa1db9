"""A received C-STORE data set parsed without reading its pixel value, and written as received.

The event is a stand-in with the parts of pynetdicom's C-STORE event these functions read (the
request's received stream, the presentation context's transfer syntax, the file meta); the
stored-file and refusal paths with real peers are in tests/test_scp.py and
tests/test_scp_robust.py.
"""

from __future__ import annotations

import socket
import struct
import threading
from io import BytesIO
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom.dsutils import decode, encode_file_meta

from dicom_node import listener
from dicom_node.listener import read_exactly
from dicom_node.received import parse_received, received_file
from dicom_node.scp import (
    STATUS_CANNOT_UNDERSTAND,
    StoreRejected,
    _decode_fully,
)

ROWS, COLUMNS = 32, 24


def image(*, encapsulated: bool = False) -> Dataset:
    """A small image with elements after Pixel Data: a private block and trailing padding."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jörg"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    pixels = np.arange(ROWS * COLUMNS, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([pixels]) if encapsulated else pixels
    if encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    block = ds.private_block(0x7FE1, "MEDGEMMA TEST", create=True)
    block.add_new(0x01, "LO", "Grüße nach den Pixeln")
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 6)  # Data Set Trailing Padding (PS3.10 7.2)
    return ds


class ReceivedEvent:
    """What the functions read of pynetdicom's C-STORE event (``dataset`` decodes in full,
    as pynetdicom's does)."""

    def __init__(self, stream: bytes, syntax: str, meta: FileMetaDataset) -> None:
        self.stream = stream
        self.request = SimpleNamespace(DataSet=BytesIO(stream))
        self.context = SimpleNamespace(transfer_syntax=syntax)
        self.file_meta = meta

    @property
    def dataset(self) -> Dataset:
        implicit = self.context.transfer_syntax == ImplicitVRLittleEndian
        return decode(BytesIO(self.stream), implicit, True)


def received_event(dataset: Dataset, syntax: str, stream: bytes | None = None) -> Any:
    if stream is None:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
        write_dataset(fp, dataset)
        stream = fp.getvalue()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = UID(syntax)
    return ReceivedEvent(stream, syntax, meta)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_every_element_but_the_pixel_value_is_read(syntax: str) -> None:
    sent = image()
    event = received_event(sent, syntax)

    parsed = parse_received(event)

    assert parsed.pixel_bytes == ROWS * COLUMNS
    assert "PixelData" not in parsed.dataset
    # As pynetdicom decodes the whole data set, the trailing elements too (in UTF-8).
    expected = [element for element in event.dataset if element.keyword != "PixelData"]
    assert list(parsed.dataset) == expected
    assert [e.tag for e in expected][-3:] == [0x7FE10010, 0x7FE11001, 0xFFFCFFFC]
    if syntax == ExplicitVRLittleEndian:
        assert parsed.dataset[0x7FE11001].value == "Grüße nach den Pixeln"
    assert event.request.DataSet.tell() == 0


def test_encapsulated_pixel_data_is_decoded_in_full() -> None:
    sent = image(encapsulated=True)
    event = received_event(sent, ExplicitVRLittleEndian)
    event.context.transfer_syntax = JPEGBaseline8Bit

    parsed = parse_received(event)

    assert parsed.pixel_bytes is None
    assert parsed.dataset["PixelData"].value == sent.PixelData


def test_a_malformed_element_after_the_pixels_still_fails_to_parse() -> None:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, image())
    # A trailing element with a VR that does not exist (PS3.5 6.2).
    garbage = struct.pack("<HH2sH", 0x7FE3, 0x0011, b"Q!", 2) + b"\x00\x02"
    event = received_event(image(), ExplicitVRLittleEndian, stream=fp.getvalue() + garbage)

    with pytest.raises(StoreRejected) as refused:
        _decode_fully(event)

    assert refused.value.status == STATUS_CANNOT_UNDERSTAND


def test_the_file_is_the_preamble_meta_and_the_received_bytes(tmp_path: Any) -> None:
    sent = image()
    event = received_event(sent, ExplicitVRLittleEndian)
    received = event.request.DataSet.getvalue()

    with received_file(event) as chunks:
        joined = b"".join(bytes(chunk) for chunk in chunks)

    assert joined == b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta) + received
    written = tmp_path / "stored.dcm"
    written.write_bytes(joined)
    assert dcmread(written) == dcmread(BytesIO(joined))
    event.request.DataSet.truncate(0)  # the view is released: the stream may change again


def test_a_pdu_is_read_whole_however_the_peer_splits_it() -> None:
    """The upper layer's socket reads (dicom_node/listener.py read_exactly): exactly the bytes
    asked for, whatever bursts they arrive in; fewer only when the peer closes."""
    sent = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    ours, peer = socket.socketpair()
    reader = SimpleNamespace(socket=ours)

    def send_in_bursts() -> None:
        for start in range(0, len(sent), 7_777):
            peer.sendall(sent[start : start + 7_777])
        peer.sendall(b"tail")
        peer.close()

    sender = threading.Thread(target=send_in_bursts)
    sender.start()
    try:
        assert read_exactly(reader, 6) == bytearray(sent[:6])  # type: ignore[arg-type]
        assert read_exactly(reader, len(sent) - 6) == bytearray(sent[6:])  # type: ignore[arg-type]
        assert read_exactly(reader, 10) == bytearray(b"tail")  # type: ignore[arg-type]
        assert read_exactly(reader, 10) == bytearray()  # type: ignore[arg-type]
    finally:
        sender.join()
        ours.close()


def test_an_announced_length_beyond_the_cap_is_read_as_it_arrives(
    monkeypatch: Any,
) -> None:
    """A PDU header may announce up to 4 GiB: past WHOLE_READ_MAX_BYTES nothing is allocated
    before the bytes come, and a peer that closes early gives back only what it sent."""
    monkeypatch.setattr(listener, "WHOLE_READ_MAX_BYTES", 16)
    ours, peer = socket.socketpair()
    try:
        peer.sendall(b"0123456789" * 5)
        peer.close()
        read = read_exactly(SimpleNamespace(socket=ours), 2**32 - 1)  # type: ignore[arg-type]
        assert read == bytearray(b"0123456789" * 5)
    finally:
        ours.close()
