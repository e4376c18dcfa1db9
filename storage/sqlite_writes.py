"""One writer at a time on a SQLite database, handed over as soon as the last one commits.

SQLite lets one connection write at a time. The others wait in its busy handler, which sleeps
between tries, longer after each miss (sqlite3's default: 1, 2, 5, 10, 15, 20, 25, 25, 25, 50,
50, then 100 ms at a time). With many writers at once (a batch's reports stored by 16 output
processes, the SCP's commits, job claims, the delivery lanes) a writer that missed a few times
sleeps up to 100 ms while the lock lies free, and keeps missing to writers that came later.
At the end of a burst on an H200 host single report transactions waited 0.3-0.6 s for the
lock at ``max_batch = 64`` and 1.3 s at 256 (benchmarks/RESULTS.md, thirteenth session); on
a two-core host 16 processes' store-like transactions waited up to 0.8 s
(``benchmarks/sqlite_writes.py``).

So every connection the node opens (``storage.db.make_engine``) takes a lock file beside the
database, ``<database>-write.lock``, by ``flock`` before its transaction's first write, and
gives it back after the commit or rollback; the next writer takes it within a millisecond.
SQLite's own lock is still taken after it, so another program writing the database (the
sqlite3 shell) is waited for as before. Reads take nothing: in WAL mode they never wait for
a writer. A writer that cannot have the lock within the connection's busy timeout gets the
error SQLite itself would give ("database is locked").
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Statements that never write (their first word); anything else takes the lock first.
_READS = frozenset(
    {"SELECT", "PRAGMA", "BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "EXPLAIN"}
)
_WRITING_BEGINS = frozenset({"IMMEDIATE", "EXCLUSIVE"})  # BEGIN IMMEDIATE takes SQLite's lock
_LONGEST_PAUSE = 0.001  # seconds between tries at most: the hand-over's delay


def writes(statement: str) -> bool:
    """Whether ``statement`` may write (its first word, BEGIN IMMEDIATE/EXCLUSIVE)."""
    words = statement.lstrip(" \t\r\n(").split(None, 2)
    if not words:
        return False
    first = words[0].upper()
    if first == "BEGIN":
        return len(words) > 1 and words[1].upper() in _WRITING_BEGINS
    return first not in _READS


class WriteLock:
    """A database's write lock as one process holds it: a thread lock among the process's
    connections, then ``flock`` on the lock file among processes (opened again in a forked
    child, which would otherwise share the parent's hold)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._threads = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=max(timeout, 0.0)):
            raise sqlite3.OperationalError("database is locked (the node's write lock)")
        try:
            self._flock(deadline)
        except BaseException:
            self._threads.release()
            raise

    def release(self) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _flock(self, deadline: float) -> None:
        descriptor, pause = self._file(), 0.00005
        while descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise sqlite3.OperationalError(
                        "database is locked (the node's write lock)"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, _LONGEST_PAUSE)

    def _file(self) -> int | None:
        """The lock file, open in this process; None when it cannot be opened: SQLite's own
        lock still keeps writers apart, only the hand-over is SQLite's again."""
        if self._pid != os.getpid():
            self._fd, self._pid = None, os.getpid()
            try:
                # Read-only suffices for flock: a user who may only read the file can take it.
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                log.warning(
                    "cannot open the write lock file %s (%s): SQLite's lock alone", self.path, exc
                )
        return self._fd


_locks: dict[Path, WriteLock] = {}
_locks_guard = threading.Lock()


def write_lock_for(database: Path) -> WriteLock:
    """The process's one WriteLock of ``database`` (every connection to it shares it)."""
    key = database.resolve()
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = WriteLock(key.with_name(key.name + "-write.lock"))
        return lock


class LockingConnection(sqlite3.Connection):
    """A sqlite3 connection that holds its database's WriteLock from its transaction's first
    write to its end (``sqlite3.connect(..., factory=LockingConnection)``)."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self._busy_timeout = float(kwargs.get("timeout", 5.0))
        path = str(database)
        # In memory, or a URI (the node never opens one): no file to put the lock beside.
        plain_path = path not in ("", ":memory:") and not path.startswith("file:")
        self._lock = write_lock_for(Path(path)) if plain_path else None
        self._holding = False

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory or LockingCursor)

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        return self.cursor().executemany(sql, parameters)

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        return self.cursor().executescript(script)

    def commit(self) -> None:
        self._ending(super().commit)

    def rollback(self) -> None:
        self._ending(super().rollback)

    def close(self) -> None:
        self._ending(super().close)

    def _ending(self, end: Callable[[], None]) -> None:
        """The transaction ends (or the connection): the lock goes back, whatever ``end`` did."""
        try:
            end()
        finally:
            self._let_go()

    def __del__(self) -> None:
        # A connection dropped without close(): SQLite's lock goes with it, so does this one.
        if getattr(self, "_holding", False):
            self._let_go()

    def before(self, statement: str) -> None:
        if self._lock is not None and not self._holding and writes(statement):
            self._lock.acquire(self._busy_timeout)
            self._holding = True

    def after(self) -> None:
        """A statement ran: the lock goes back once no transaction is open (autocommit)."""
        if self._holding and not self.in_transaction:
            self._let_go()

    def _let_go(self) -> None:
        if self._holding and self._lock is not None:
            self._holding = False
            self._lock.release()


class LockingCursor(sqlite3.Cursor):
    def execute(self, sql: str, parameters: Any = (), /) -> LockingCursor:
        return self._run(sql, super().execute, sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> LockingCursor:
        return self._run(sql, super().executemany, sql, parameters)

    def executescript(self, script: str, /) -> LockingCursor:
        return self._run(script, super().executescript, script)

    def _run(self, statement: str, run: Callable[..., object], *arguments: Any) -> LockingCursor:
        """``run(*arguments)`` with the lock taken first when ``statement`` may write."""
        connection = self.connection
        assert isinstance(connection, LockingConnection)
        connection.before(statement)
        try:
            run(*arguments)
        finally:
            connection.after()
        return self
