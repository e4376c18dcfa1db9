"""What the node refuses at start, and how it says so: a bad environment variable by its name,
a broken site question template by its file and key; and where an exception that ends a thread
is written."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pynetdicom.fsm import InvalidEventError

from config.settings import ENV_PREFIX, ConfigError, ModelSettings, load_settings
from inference.prompts import PromptTemplateError, check_templates
from medgemma_node.logs import setup_logging
from peers.net import free_port
from peers.node_process import REPO, write_toml


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`medgemma-node ARGS` with exactly the MEDGEMMA_NODE_* variables given."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return subprocess.run(
        [sys.executable, "-m", "medgemma_node.cli", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- environment variables ------------------------------------------------------------------


def test_bad_environment_variable_is_named_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path / "node.toml", {"dicom": {"ae_title": "FROM_FILE"}})
    monkeypatch.setenv("MEDGEMMA_NODE_DICOM__PORT", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith("invalid configuration in the environment:")
    assert "dicom.port (environment variable MEDGEMMA_NODE_DICOM__PORT): " in message
    assert str(path) not in message
    assert "abc" not in message  # values are not echoed: they may be secrets


def test_file_and_environment_errors_each_name_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path / "node.toml", {"dicom": {"port": 99999}})
    monkeypatch.setenv("medgemma_node_dicom__max_pdu", "-1")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid configuration in {path}:"
    assert any(line.startswith("dicom.port: ") for line in lines)
    assert any(
        line.startswith("dicom.max_pdu (environment variable medgemma_node_dicom__max_pdu): ")
        for line in lines
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MEDGEMMA_NODE_DICOM__PROT", "1", "dicom.prot (environment variable "),
        ("MEDGEMMA_NODE_DESTINATIONS", "not json", "destinations (environment variable "),
        ("MEDGEMMA_NODE_DICOM", '{"port": "x"}', "dicom.port (environment variable "),
    ],
)
def test_validate_config_names_the_variable(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    path = write_toml(tmp_path / "node.toml", {"dicom": {"ae_title": "FROM_FILE"}})
    result = cli("validate-config", "--config", str(path), env={variable: value})
    assert result.returncode == 2
    assert f"{expected}{variable})" in result.stderr
    assert str(path) not in result.stderr
    assert "Traceback" not in result.stderr


# -- question templates ---------------------------------------------------------------------


def broken_site_templates(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chest.toml").write_text(
        'en = "Describe the chest radiograph."\n[match]\nmodalty = "CR"\n', encoding="utf-8"
    )
    return directory


def test_check_templates_names_setting_file_and_key(tmp_path: Path) -> None:
    site = broken_site_templates(tmp_path / "prompts")
    with pytest.raises(PromptTemplateError) as info:
        check_templates(ModelSettings(prompts_dir=site))
    message = str(info.value)
    assert message.startswith(f"model.prompts_dir = {site}: {site / 'chest.toml'}: ")
    assert "match.modalty: Extra inputs are not permitted" in message


def test_check_templates_returns_the_library(tmp_path: Path) -> None:
    site = tmp_path / "prompts"
    site.mkdir()
    (site / "knee.toml").write_text(
        'en = "Describe the knee."\n[match]\nbody_part = "KNEE"\n', encoding="utf-8"
    )
    library = check_templates(ModelSettings(prompts_dir=site))
    assert library.select("CR", "KNEE").template_name == "knee"


def test_validate_config_refuses_a_broken_template(tmp_path: Path) -> None:
    site = broken_site_templates(tmp_path / "prompts")
    path = write_toml(tmp_path / "node.toml", {"model": {"prompts_dir": str(site)}})
    result = cli("validate-config", "--config", str(path))
    assert result.returncode == 2
    assert str(site / "chest.toml") in result.stderr
    assert "match.modalty" in result.stderr
    assert result.stdout.strip() == ""


def test_validate_config_refuses_a_missing_template_directory(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "node.toml", {"model": {"prompts_dir": str(tmp_path / "no")}})
    result = cli("validate-config", "--config", str(path))
    assert result.returncode == 2
    assert "model.prompts_dir" in result.stderr
    assert "prompt template directory not found" in result.stderr


def test_serve_refuses_a_broken_template_before_listening(tmp_path: Path) -> None:
    site = broken_site_templates(tmp_path / "prompts")
    sections = {
        "dicom": {"bind_address": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(tmp_path / "data")},
        "metrics": {"enabled": False},
        "model": {"prompts_dir": str(site)},
    }
    path = write_toml(tmp_path / "node.toml", sections)
    result = cli("serve", "--config", str(path), timeout=120)
    assert result.returncode == 2
    assert "configuration error" in result.stderr
    assert f"{site / 'chest.toml'}: match.modalty" in result.stderr
    assert not (tmp_path / "data" / "node.db").exists()  # refused before anything started


# -- exceptions that end a thread -----------------------------------------------------------


@pytest.fixture
def node_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> Path:
    """setup_logging into a file; the root handlers (restore_logging) and the thread hook
    restored after."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    path = tmp_path / "logs" / "node.log"
    setup_logging("INFO", path)
    return path


def run_thread(target: object, name: str) -> None:
    thread = threading.Thread(target=target, name=name)  # type: ignore[arg-type]
    thread.start()
    thread.join(10)


def test_an_uncaught_thread_exception_is_logged_without_its_message(node_log: Path) -> None:
    patient_name = "DOE" + "^JANE"  # built, so the source line in the frames does not show it

    def fails() -> None:
        raise ValueError(f"value {patient_name!r} does not fit")  # a library quoting data

    run_thread(fails, "worker-x")
    text = node_log.read_text()
    assert "ERROR   medgemma_node.threads: uncaught ValueError ended thread worker-x:" in text
    assert "in fails" in text  # the frames are kept
    assert "DOE^JANE" not in text


def test_pynetdicom_state_machine_error_is_one_line(node_log: Path) -> None:
    def breaks() -> None:
        # What pynetdicom's DUL thread does on an event its state table lacks (fsm.py).
        logging.getLogger("pynetdicom.fsm").error(
            "Invalid event 'Evt7' for the current state 'Sta13'"
        )
        raise InvalidEventError("Invalid event 'Evt7' for the current state 'Sta13'")

    run_thread(breaks, "dicom-in 127.0.0.1:40000 (upper layer)")
    text = node_log.read_text()
    assert "Traceback" not in text
    (line,) = [line for line in text.splitlines() if "Evt7" in line]
    assert line.endswith(
        "WARNING medgemma_node.threads: DICOM connection dicom-in 127.0.0.1:40000 "
        "(upper layer) dropped: Invalid event 'Evt7' for the current state 'Sta13'"
    )
