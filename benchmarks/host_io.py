"""What this host's disk and loopback allow for ingest, with the node's own durable write.

Ingest of large images is bounded by the host before it is bounded by the node: each received
instance is written with ``storage.files.write_durably`` (write, fsync, rename, directory
fsync) and arrives over TCP. This prints, for files of ``--mb`` MB:

* durable writes per second into ``--dir`` from 1 and from ``--threads`` threads (the SCP writes
  from one thread per association);
* loopback TCP MB/s over 1 and ``--threads`` connections (what the associations' bytes can
  cross before any DICOM work).

    python -m benchmarks.host_io --dir /var/lib/medgemma-node --mb 7.2 --count 60 --threads 4
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage.files import write_durably

CHUNK = 1 << 20


def durable_writes_per_s(directory: Path, payload: bytes, count: int, threads: int) -> float:
    """Files of ``payload`` written durably per second, ``threads`` writers at once."""
    target = directory / f"host-io-{uuid.uuid4().hex}"

    def write(index: int) -> None:
        write_durably(target / f"{index % 16:02d}" / f"{index}.dcm", payload)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(count)))
    seconds = time.perf_counter() - started
    shutil.rmtree(target, ignore_errors=True)
    return count / seconds


def _drain(listener: socket.socket, total: int) -> None:
    connection, _ = listener.accept()
    with connection:
        buffer = bytearray(CHUNK)
        received = 0
        while received < total:
            got = connection.recv_into(buffer)
            if not got:
                break
            received += got


def loopback_mb_per_s(total_mb: float, connections: int) -> float:
    """MB/s sent over ``connections`` loopback TCP connections at once, ``total_mb`` each."""
    total = int(total_mb * 1e6)
    listeners = []
    for _ in range(connections):
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
    readers = [threading.Thread(target=_drain, args=(lst, total)) for lst in listeners]
    for reader in readers:
        reader.start()
    block = b"\0" * CHUNK

    def send(listener: socket.socket) -> None:
        with socket.create_connection(listener.getsockname()) as sender:
            sent = 0
            while sent < total:
                sender.sendall(block)
                sent += len(block)

    started = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(send, listeners))
    for reader in readers:
        reader.join()
    seconds = time.perf_counter() - started
    for listener in listeners:
        listener.close()
    return total_mb * connections / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    parser.add_argument("--mb", type=float, default=7.2, help="file size, MB")
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    payload = b"\1" * int(args.mb * 1e6)
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        for threads in (1, args.threads):
            rate = durable_writes_per_s(Path(work), payload, args.count, threads)
            print(
                f"durable writes, {threads} thread(s): {rate:7.1f} files/s "
                f"({rate * args.mb:7.1f} MB/s) into {args.dir or tempfile.gettempdir()}",
                flush=True,
            )
    for connections in (1, args.threads):
        rate = loopback_mb_per_s(args.mb * args.count / connections, connections)
        print(
            f"loopback TCP, {connections} connection(s): {rate:8.1f} MB/s "
            f"({rate / args.mb:7.1f} files/s of {args.mb} MB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
