"""Write transactions from many processes on one SQLite database: how long each waits for
the write lock, with the node's lock file (storage/sqlite_writes.py) and, as the reference in
the same run, SQLite's busy handler alone.

Each of ``--processes`` processes commits ``--transactions`` transactions shaped like a
report's store (a job's row, then rows inserted; WAL, synchronous=FULL, the node's engine
from ``storage.db.make_engine``), with ``--work-ms`` of other work between them, all starting
together as a batch's reports reach the output processes. Printed per way, alternated
``--rounds`` times: wall seconds, and the wait before a transaction's first write could run
(p50, p90, max).

    python -m benchmarks.sqlite_writes [--processes 16] [--transactions 20] [--work-ms 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from storage.db import make_engine

SCHEMA = (
    "CREATE TABLE job (id INTEGER PRIMARY KEY, status TEXT, owner TEXT)",
    "CREATE TABLE row (id INTEGER PRIMARY KEY, job_id INTEGER, payload TEXT)",
)


def store_like_reports(
    url: str, write_lock: bool, start_at: float, transactions: int, work_s: float
) -> list[float]:
    """In a process of its own: the waits of ``transactions`` store-like transactions."""
    engine = make_engine(url, write_lock=write_lock)
    waits = []
    while time.time() < start_at:
        time.sleep(0.0005)
    for _ in range(transactions):
        time.sleep(work_s)
        began = time.perf_counter()
        with engine.begin() as connection:
            added = connection.execute(
                text("INSERT INTO job (status, owner) VALUES ('running', 'x')")
            )
            waits.append(time.perf_counter() - began)
            job = {"id": added.lastrowid}
            connection.execute(text("UPDATE job SET status = 'done' WHERE id = :id"), job)
            for kind in ("report", "sr", "oru", "json"):
                connection.execute(
                    text("INSERT INTO row (job_id, payload) VALUES (:job, :payload)"),
                    {"job": job["id"], "payload": kind * 50},
                )
    engine.dispose()
    return waits


def one_way(
    directory: Path, write_lock: bool, args: argparse.Namespace
) -> tuple[float, list[float]]:
    url = f"sqlite:///{directory / f'writes-{write_lock}-{time.monotonic_ns()}.db'}"
    engine = make_engine(url)
    with engine.begin() as connection:
        for statement in SCHEMA:
            connection.execute(text(statement))
    engine.dispose()
    start_at = time.time() + 1.5  # every process started and connected
    work = (url, write_lock, start_at, args.transactions, args.work_ms / 1000)
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.processes) as pool:
        results = pool.starmap(store_like_reports, [work] * args.processes)
        seconds = time.time() - start_at
    return seconds, [wait for waits in results for wait in waits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--transactions", type=int, default=20)
    parser.add_argument("--work-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    print(
        f"{args.processes} processes x {args.transactions} transactions, "
        f"{args.work_ms:g} ms of other work between them"
    )
    with tempfile.TemporaryDirectory(prefix="sqlite-writes-", dir=args.dir) as directory:
        for _ in range(args.rounds):
            for write_lock in (True, False):
                seconds, waits = one_way(Path(directory), write_lock, args)
                name = "node's lock file" if write_lock else "busy handler alone (reference)"
                ordered = sorted(waits)
                print(
                    f"  {name:<31} {seconds:6.2f} s   wait p50 "
                    f"{statistics.median(waits) * 1000:6.1f} ms  p90 "
                    f"{ordered[int(len(ordered) * 0.9)] * 1000:6.1f} ms  max "
                    f"{ordered[-1] * 1000:7.1f} ms"
                )


if __name__ == "__main__":
    main()
