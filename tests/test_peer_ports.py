"""peers.net.free_port never hands a port out twice in one process (two peers, or one peer's
two listeners, given the same port cannot both start)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from peers import net


def test_free_port_hands_out_each_port_once() -> None:
    ports = [net.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    for port in ports[:5]:  # free to bind: nothing holds them
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_the_kernel_gives_again_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel handing the same port to two binds in a row (what made Orthanc's DICOM and
    HTTP ports one and the same)."""
    given = iter([50001, 50001, 50002])

    class Socket:
        def __enter__(self) -> Socket:
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def bind(self, _: tuple[str, int]) -> None:
            self.port = next(given)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(net, "_handed_out", set())
    monkeypatch.setattr(net, "socket", SimpleNamespace(socket=Socket))
    assert (net.free_port(), net.free_port()) == (50001, 50002)
