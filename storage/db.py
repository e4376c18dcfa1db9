"""Database engine, sessions and schema migrations.

SQLite (the default) runs in WAL mode with a busy timeout so the SCP threads, the completion
scheduler and the workers can share one file; PostgreSQL needs nothing special.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import StorageError
from storage.sqlite_writes import LockingConnection

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class DatabaseUnavailable(StorageError):
    """The database could not be reached or could not run the transaction (server down,
    connection lost, SQLite locked past its busy timeout, disk I/O error)."""


@contextmanager
def _unavailable_as_storage_error() -> Iterator[None]:
    """SQLAlchemy's OperationalError becomes DatabaseUnavailable where it enters the node.

    The message is the driver's own (e.g. "database is locked"), not SQLAlchemy's, which
    quotes the statement and its parameters (they may hold patient data); the original stays
    chained as ``__cause__``.
    """
    try:
        yield
    except OperationalError as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc


class Database:
    """One engine and its session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on any error.

        Raises DatabaseUnavailable when the database cannot be reached or the commit fails.
        """
        with _unavailable_as_storage_error(), self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A Core connection for reads (no transaction kept); DatabaseUnavailable as above."""
        with _unavailable_as_storage_error(), self.engine.connect() as connection:
            yield connection

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A Core connection in a transaction that commits on success; as ``session()``."""
        with _unavailable_as_storage_error(), self.engine.begin() as connection:
            yield connection

    def upgrade(self) -> None:
        upgrade(self.engine)

    def is_current(self) -> bool:
        return current_revision(self.engine) == head_revision()

    def dispose(self) -> None:
        self.engine.dispose()


def make_engine(url: str, *, write_lock: bool = True) -> Engine:
    """The engine of ``url``; on SQLite each connection takes the node's write lock before
    its transaction's first write (storage/sqlite_writes.py), unless ``write_lock`` is False
    (the reference of benchmarks/sqlite_writes.py)."""
    if url.startswith("sqlite"):
        _ensure_sqlite_parent(url)
        connect_args: dict[str, Any] = {"timeout": 30, "check_same_thread": False}
        if write_lock:
            connect_args["factory"] = LockingConnection
        engine = create_engine(url, connect_args=connect_args)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _ensure_sqlite_parent(url: str) -> None:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer; synchronous=FULL keeps committed rows through a
    # power loss (the C-STORE Success promise depends on the commit being durable).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (alembic upgrade head)."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
