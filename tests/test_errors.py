"""One exception tree (core/errors.py): every exception of the node derives from NodeError, in
the family of the package that raises it; third-party errors are wrapped where they enter."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError
from sqlalchemy import text

from core import errors
from core.validation import format_validation_error
from storage.db import Database, DatabaseUnavailable

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(
    path.parent.name
    for path in ROOT.glob("*/__init__.py")
    if path.parent.name not in {"tests", "benchmarks", "peers"}
)
GPU_ONLY_PACKAGES = {"triton", "bitsandbytes"}
FAMILY_OF_PACKAGE = {
    "config": errors.ConfigError,
    "storage": errors.StorageError,
    "dicom_node": errors.DicomError,
    "inference": errors.InferenceError,
    "hl7_out": errors.HL7Error,
    "delivery": errors.DeliveryError,
    "api": errors.ApiError,
}


def project_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in a module of the node (migrations are not modules)."""
    found = []
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        for info in pkgutil.walk_packages(path, f"{package}."):
            if ".migrations" in info.name:
                continue
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as exc:  # e.g. the Triton kernels on a machine without
                if exc.name not in GPU_ONLY_PACKAGES:  # a GPU: their own tests cover them there
                    raise
                continue
            found += [
                value
                for value in vars(module).values()
                if inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ]
    return found


def test_every_exception_is_a_node_error_of_its_package_family() -> None:
    exceptions = project_exceptions()
    names = {cls.__name__ for cls in exceptions}
    assert {"StoreRejected", "ModelLoadError", "OruBuildError", "DatabaseUnavailable"} <= names
    outside = [cls.__qualname__ for cls in exceptions if not issubclass(cls, errors.NodeError)]
    assert outside == []
    misplaced = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in exceptions
        if (family := FAMILY_OF_PACKAGE.get(cls.__module__.split(".")[0])) is not None
        and not issubclass(cls, family)
    ]
    assert misplaced == []


def test_built_in_second_bases_stay_for_callers_that_catch_them() -> None:
    from config.settings import ConfigError
    from hl7_out.ack import AckParseError
    from hl7_out.oru import OruBuildError
    from inference.engine import OutOfMemory
    from inference.preprocess import PreprocessError
    from inference.prompts import PromptTemplateError
    from inference.transformers_engine import ModelLoadError

    assert ConfigError is errors.ConfigError  # still importable where it is raised
    for value_error in (PreprocessError, PromptTemplateError, OruBuildError, AckParseError):
        assert issubclass(value_error, ValueError)
    for runtime_error in (ModelLoadError, OutOfMemory):
        assert issubclass(runtime_error, RuntimeError)


def test_an_unreachable_database_is_database_unavailable(tmp_path: Path) -> None:
    """SQLite that cannot open its file (the path is a directory): OperationalError enters
    as DatabaseUnavailable from every way the node opens the database, the driver's message
    kept and SQLAlchemy's original chained."""
    (tmp_path / "node.db").mkdir()
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        for opened in (db.session, db.connect, db.begin):
            unavailable = pytest.raises(DatabaseUnavailable, match="unable to open database")
            with unavailable as caught, opened() as connection:
                connection.execute(text("SELECT 1"))
            assert caught.value.__cause__ is not None
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_postgres_server_that_refuses_is_database_unavailable() -> None:
    db = Database("postgresql+psycopg://postgres@127.0.0.1:1/test")  # nothing listens on port 1
    try:
        with pytest.raises(DatabaseUnavailable, match="database unavailable"), db.session() as s:
            s.execute(text("SELECT :secret"), {"secret": "Doe^Jane"})
    finally:
        db.dispose()


def test_a_failing_statement_does_not_quote_its_parameters(tmp_path: Path) -> None:
    """The wrapped message is the driver's: statement parameters (patient data) stay out."""
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        with pytest.raises(DatabaseUnavailable) as caught, db.session() as session:
            session.execute(text("SELECT * FROM no_such_table WHERE name = :n"), {"n": "Doe^Jane"})
        assert "no such table" in str(caught.value)
        assert "Doe^Jane" not in str(caught.value)
    finally:
        db.dispose()


class _Sample(BaseModel):
    port: int
    nested: dict[str, int]


def test_validation_errors_name_each_key_once() -> None:
    with pytest.raises(ValidationError) as caught:
        _Sample.model_validate({"port": "x", "nested": {"a": "y"}})
    assert format_validation_error(caught.value).splitlines() == [
        "port: Input should be a valid integer, unable to parse string as an integer",
        "nested.a: Input should be a valid integer, unable to parse string as an integer",
    ]
    with pytest.raises(ValidationError) as caught:
        _Sample.model_validate(3)
    assert format_validation_error(caught.value, separator="; ", root="(file)").startswith(
        "(file): "
    )
