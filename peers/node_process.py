"""Start `medgemma-node serve` (and its CLI) as a real subprocess on loopback, for the tests and
the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peers.net import echo_ok, free_port

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_toml(path: Path, sections: dict[str, Any]) -> Path:
    """A minimal TOML writer: tables of scalars and arrays of tables ([[destinations]])."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
                lines.append("")
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class NodeProcess:
    """One `medgemma-node serve` subprocess with its own config, data dir and ports."""

    def __init__(
        self, workdir: Path, sections: dict[str, Any], extra_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.port = int(sections.get("dicom", {}).get("port") or free_port())
        sections = {**sections}
        sections["dicom"] = {
            "ae_title": "MEDGEMMA",
            "bind_address": "127.0.0.1",
            **sections.get("dicom", {}),
            "port": self.port,
        }
        sections["storage"] = {"data_dir": str(self.data_dir), **sections.get("storage", {})}
        sections.setdefault("metrics", {"enabled": False})
        sections.setdefault("api", {"enabled": False})  # tests that use it pass a free port
        self.sections = sections
        self.config_path = write_toml(workdir / "node.toml", sections)
        self.stderr_path = workdir / "serve.stderr.log"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def probe_aet(self) -> str:
        """A calling AE title the node accepts (the first allowed one when it restricts them)."""
        allowed = self.sections["dicom"].get("allowed_calling_aets") or ["PROBE"]
        return str(allowed[0])

    @property
    def api_url(self) -> str:
        api = self.sections["api"]
        return f"http://127.0.0.1:{api['port']}/api"

    @property
    def database_url(self) -> str:
        url = self.sections["storage"].get("database_url")
        return str(url) if url else f"sqlite:///{(self.data_dir / 'node.db').resolve()}"

    def start(self, wait: bool = True) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env.pop("MEDGEMMA_NODE_DICOM__PORT", None)
        # The child keeps its own copy of the descriptor; closing ours avoids a leak per start.
        with self.stderr_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "medgemma_node.cli",
                    "serve",
                    "--config",
                    str(self.config_path),
                ],
                cwd=self.workdir,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill9()  # never leave a half-started server behind a failed test
                raise
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if echo_ok(self.port, calling_aet=self.probe_aet):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"serve did not answer C-ECHO in {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_text(self) -> str:
        """Everything the node wrote to its logs: stderr and the log files."""
        texts = [self.stderr()]
        for path in sorted((self.data_dir / "logs").glob("*")):
            texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`medgemma-node ARGS` as a subprocess, with no MEDGEMMA_NODE_* variables inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_NODE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "medgemma_node.cli", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
