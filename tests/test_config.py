"""Settings: defaults, the TOML file, environment overrides, errors that name the bad key."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from config.settings import ENV_PREFIX, ConfigError, ModelSettings, NodeSettings, load_settings
from peers.node_process import REPO, run_cli

EXAMPLE = REPO / "config" / "node.example.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: a developer's MEDGEMMA_NODE_* must not leak in."""
    import os

    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert settings.dicom.port == 11112
    assert settings.dicom.ae_title == "MEDGEMMA"
    assert settings.dicom.allowed_calling_aets == []
    assert settings.storage.data_dir == Path("data")
    assert settings.database_url == f"sqlite:///{Path('data/node.db').resolve()}"
    assert settings.completion.quiet_seconds("CR", "ANY") == 5
    assert settings.completion.quiet_seconds("CT", "ANY") == 30
    assert settings.completion.quiet_seconds("US", "ANY") == settings.completion.default_seconds
    assert settings.destinations == []


def test_toml_file_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "node.toml",
        """
[dicom]
ae_title = "SITE_NODE"
port = 4242
allowed_calling_aets = ["MODALITY1"]

[storage]
data_dir = "/srv/node"
database_url = "postgresql+psycopg://node@db/medgemma"

[completion]
default_seconds = 7
rules = [{ modality = "CR", calling_ae = "MODALITY1", seconds = 2 }]

[[destinations]]
name = "pacs"
kind = "dicom"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4243
""",
    )
    settings = load_settings(path)
    assert settings.dicom.ae_title == "SITE_NODE"
    assert settings.dicom.port == 4242
    assert settings.dicom.allowed_calling_aets == ["MODALITY1"]
    assert settings.database_url == "postgresql+psycopg://node@db/medgemma"
    assert settings.completion.quiet_seconds("CR", "MODALITY1") == 2
    assert settings.completion.quiet_seconds("CR", "OTHER") == 7
    assert settings.destinations[0].kind == "dicom"
    assert settings.destinations[0].port == 4243
    # Sections not in the file keep their defaults.
    assert settings.model.model_id == NodeSettings().model.model_id


def test_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "node.toml", '[dicom]\nport = 4242\nae_title = "FROM_FILE"\n')
    monkeypatch.setenv("MEDGEMMA_NODE_DICOM__PORT", "5555")
    settings = load_settings(path)
    assert settings.dicom.port == 5555
    # The override is per key: the rest of the file's table still applies.
    assert settings.dicom.ae_title == "FROM_FILE"


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGEMMA_NODE_DICOM__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        load_settings()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[dicom]\nport = 99999\n", "dicom.port"),
        ('[dicom]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n', "dicom.ae_title"),
        ('[dicom]\nallowed_calling_aets = ["BAD\\\\AE"]\n', "dicom.allowed_calling_aets"),
        ('[model]\nquantization = "fp4"\n', "model.quantization"),
        ('[completion]\nrules = [{ modality = "CR", seconds = -1 }]\n', "completion.rules.0"),
        ("[storage]\nmin_free_disk_mb = -5\n", "storage.min_free_disk_mb"),
        ('[[destinations]]\nname = "p"\nkind = "dicom"\nhost = "h"\nport = 1\n', "ae_title"),
        # A UID root (PS3.5 9.1): digits and dots, no leading zero, room for the suffix.
        ('[identity]\nuid_root = "1.2.0840."\n', "identity.uid_root"),
        ('[identity]\nuid_root = "1.2.x."\n', "identity.uid_root"),
        ('[identity]\nuid_root = "1.2.3"\n', "identity.uid_root"),
        ('[identity]\nuid_root = "' + "1." * 25 + '"\n', "identity.uid_root"),
    ],
)
def test_error_names_the_bad_key(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_bad_toml_syntax_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[dicom]\nport 11112\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert "line 2" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[dicom]\nprot = 11112\n", "dicom.prot"),
        ('[dicom]\nallowed_calling_aet = ["MOD1"]\n', "dicom.allowed_calling_aet"),
        ("[storage]\nmin_free_disk = 10\n", "storage.min_free_disk"),
        ("[dicom.tls]\nenable = true\n", "dicom.tls.enable"),
        ("[nonsense]\nx = 1\n", "nonsense"),
    ],
)
def test_unknown_key_is_rejected(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path / "typo.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert key in str(info.value)


def test_duplicate_destination_names_are_rejected(tmp_path: Path) -> None:
    destination = '[[destinations]]\nname = "same"\nkind = "file"\ndirectory = "out"\n'
    path = write(tmp_path / "dup.toml", destination * 2)
    with pytest.raises(ConfigError, match="same"):
        load_settings(path)


def test_validate_config_prints_effective_settings(tmp_path: Path) -> None:
    path = write(tmp_path / "node.toml", '[dicom]\nport = 4242\nae_title = "PRINTED"\n')
    result = run_cli("validate-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["dicom"]["port"] == 4242
    assert effective["dicom"]["ae_title"] == "PRINTED"
    assert effective["completion"]["default_seconds"] == 15.0


def test_validate_config_reports_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "[dicom]\nport = 99999\nprot = 1\n")
    result = run_cli("validate-config", "--config", str(path))
    assert result.returncode == 2
    assert "dicom.port" in result.stderr
    assert "dicom.prot" in result.stderr
    assert result.stdout.strip() == ""


def test_validate_config_reports_bad_syntax(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[dicom\nport = 1\n")
    result = run_cli("validate-config", "--config", str(path))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr


# -- config/node.example.toml ----------------------------------------------------------------


def option_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted names of every option, descending into sub-tables."""
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from option_paths(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def toml_paths(table: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in table.items():
        if isinstance(value, dict):
            yield from toml_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def commented_paths(text: str) -> set[str]:
    """Options shown commented out (those whose default is "unset"), qualified by table."""
    found: set[str] = set()
    table = ""
    for line in text.splitlines():
        header = re.match(r"^\[([\w.]+)\]", line)
        if header:
            table = header.group(1) + "."
        option = re.match(r"^#\s*(\w+)\s*=", line)
        if option and table:
            found.add(table + option.group(1))
    return found


def test_example_config_validates_and_equals_defaults() -> None:
    example = load_settings(EXAMPLE)
    defaults = NodeSettings()
    assert example.model_dump(exclude={"destinations"}) == defaults.model_dump(
        exclude={"destinations"}
    )


def test_example_config_shows_every_option() -> None:
    import tomllib

    text = EXAMPLE.read_text(encoding="utf-8")
    shown = set(toml_paths(tomllib.loads(text))) | commented_paths(text)
    options = {p for p in option_paths(NodeSettings) if not p.startswith("destinations")}
    assert options - shown == set()
    assert "[[destinations]]" in text
    assert tomllib.loads(text).get("destinations") is None  # examples only, commented out


def test_example_config_passes_validate_config() -> None:
    result = run_cli("validate-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dicom"]["port"] == 11112


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(2, (0, 0)), (4, (1, 4)), (6, (1, 6)), (12, (3, 12)), (16, (4, 16)), (64, (4, 16))],
)
def test_render_and_output_processes_follow_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert ModelSettings().processes() == expected
    assert ModelSettings(render_processes=2, output_processes=0).processes() == (2, 0)
