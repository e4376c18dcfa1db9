"""The node's SQLite write lock (storage/sqlite_writes.py): taken at a transaction's first
write, given back at its end, waited for by other processes' writers, and refused with
SQLite's own error after the busy timeout."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import sqlite3
import threading
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.db import Database
from storage.sqlite_writes import WriteLock, writes


@pytest.mark.parametrize(
    ("statement", "may_write"),
    [
        ("SELECT * FROM job", False),
        ("  select 1", False),
        ("PRAGMA synchronous", False),
        ("BEGIN", False),
        ("BEGIN IMMEDIATE", True),
        ("begin exclusive transaction", True),
        ("COMMIT", False),
        ("SAVEPOINT sa_1", False),
        ("INSERT INTO job (id) VALUES (1)", True),
        ("\n  UPDATE job SET status = 'done'", True),
        ("DELETE FROM job", True),
        ("WITH done AS (SELECT 1) DELETE FROM job", True),
        ("CREATE TABLE t (x INTEGER)", True),
        ("", False),
    ],
)
def test_which_statements_take_the_lock(statement: str, may_write: bool) -> None:
    assert writes(statement) is may_write


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    with db.session() as session:
        session.execute(text("CREATE TABLE t (x INTEGER)"))
    yield db
    db.dispose()


def lock_path(database: Database) -> Path:
    return Path(database.url.split("///", 1)[1] + "-write.lock")


def lock_is_free(database: Database) -> bool:
    """Whether another holder could take the database's lock file now."""
    descriptor = os.open(lock_path(database), os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)  # closing gives back a lock taken here
    return True


def test_held_from_the_first_write_to_the_commit(database: Database) -> None:
    with database.session() as session:
        session.execute(text("SELECT * FROM t")).all()
        assert lock_is_free(database)  # reads take nothing
        session.execute(text("INSERT INTO t VALUES (1)"))
        assert not lock_is_free(database)
    assert lock_is_free(database)


def test_given_back_on_rollback(database: Database) -> None:
    with pytest.raises(KeyError), database.session() as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
        assert not lock_is_free(database)
        raise KeyError("the transaction rolls back")
    assert lock_is_free(database)
    with database.session() as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar() == 0


def insert_in_another_process(url: str, ready: Event, done: Event) -> None:
    db = Database(url)
    ready.set()
    with db.session() as session:
        session.execute(text("INSERT INTO t VALUES (2)"))
    done.set()
    db.dispose()


def test_another_processs_writer_waits_for_the_lock_file(database: Database) -> None:
    """SQLite's own lock is free here: the writer waits for the lock file alone."""
    holder = os.open(lock_path(database), os.O_RDONLY | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another process's writer holds it
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    writer = context.Process(target=insert_in_another_process, args=(database.url, ready, done))
    try:
        writer.start()
        assert ready.wait(60)
        assert not done.wait(0.5)
    finally:
        os.close(holder)  # closing gives the lock back
    assert done.wait(60)
    writer.join(60)
    assert writer.exitcode == 0
    with database.session() as session:
        assert session.execute(text("SELECT x FROM t")).scalars().all() == [2]


def test_a_thread_of_the_same_process_waits_for_the_holders_commit(database: Database) -> None:
    """Connections of one process share its hold of the lock file: a thread lock orders them."""
    started, done = threading.Event(), threading.Event()

    def insert() -> None:
        started.set()
        with database.session() as session:
            session.execute(text("INSERT INTO t VALUES (2)"))
        done.set()

    writer = threading.Thread(target=insert)
    with database.session() as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
        writer.start()
        assert started.wait(10)
        assert not done.wait(0.3)  # the process's hold is this transaction's
    assert done.wait(30)
    writer.join(30)
    with database.session() as session:
        assert session.execute(text("SELECT x FROM t ORDER BY rowid")).scalars().all() == [1, 2]


def test_a_writer_that_cannot_have_it_gets_sqlites_error(tmp_path: Path) -> None:
    lock_file = tmp_path / "node.db-write.lock"
    holder = os.open(lock_file, os.O_RDONLY | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another process's writer would
    try:
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            WriteLock(lock_file).acquire(timeout=0.05)
    finally:
        os.close(holder)
    lock = WriteLock(lock_file)
    lock.acquire(timeout=0.05)  # free now
    lock.release()


def test_without_a_lock_file_sqlites_lock_alone_keeps_writers_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock file that cannot be created (no such directory here, a read-only data directory
    in the field): the writer goes on, with a warning."""
    lock = WriteLock(tmp_path / "missing" / "node.db-write.lock")
    lock.acquire(timeout=0.05)
    lock.release()
    lock.acquire(timeout=0.05)  # the thread lock was given back
    lock.release()
    assert "cannot open the write lock file" in caplog.text
