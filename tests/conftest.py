"""Shared fixtures: databases (SQLite file and a throwaway PostgreSQL database), real images."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from peers.dicom_files import testdata
from storage.db import Database

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not postgres_available():
        pytest.fail("PostgreSQL is not running at 127.0.0.1:5432 (see README: tests need it)")
    name = f"mgn_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def rg1_unci() -> Path:
    return testdata("RG1_UNCI.dcm")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger's handlers and level as they were, after a test that set up the node's
    logging (medgemma_node.logs.setup_logging)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


# The tiny random Gemma 3 (inference/demo_model.py), once per test module that asks for it:
# its directory, the processor (left padding, as the engine batches) and the model in float32.
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.demo_model import write_demo_model

    path = tmp_path_factory.mktemp("demo-model")
    write_demo_model(path)
    return path


@pytest.fixture(scope="module")
def processor(demo_dir: Path) -> Any:
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(demo_dir)
    proc.tokenizer.padding_side = "left"
    return proc


@pytest.fixture(scope="module")
def model(demo_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(demo_dir, dtype=torch.float32).eval()
