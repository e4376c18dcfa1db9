"""The PID file of `serve` (<data>/run/serve.pid) and `medgemma-node stop`.

`serve` writes its pid before it starts its parts and removes the file when it has stopped.
`stop` sends SIGTERM (the node stops its parts in order: the SCP first, so no C-STORE is cut
short after its Success) and waits a bounded time for the process to end.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import NodeError
from core.processes import process_alive

PID_FILE = Path("run") / "serve.pid"
POLL_S = 0.1


class AlreadyRunning(NodeError):
    """Another `serve` holds this data directory."""


def pid_path(data_dir: Path) -> Path:
    return data_dir / PID_FILE


def read_pid(data_dir: Path) -> int | None:
    try:
        return int(pid_path(data_dir).read_text().strip())
    except (OSError, ValueError):
        return None


def is_node_process(pid: int) -> bool:
    """Alive, and (where /proc tells) running medgemma-node: a pid reused by another program
    after a crash is never signalled."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the file
    return b"medgemma" in command_line


def write_pid_file(data_dir: Path) -> Path:
    """Write our pid; refuse when a live node already holds the data directory."""
    path = pid_path(data_dir)
    other = read_pid(data_dir)
    if other is not None and other != os.getpid() and is_node_process(other):
        raise AlreadyRunning(f"`serve` is already running on {data_dir} (pid {other})")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(f"{os.getpid()}\n")
    os.replace(temp, path)
    return path


def remove_pid_file(path: Path) -> None:
    """Remove the file if it still names this process."""
    try:
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


@dataclass(frozen=True)
class StopResult:
    pid: int | None
    outcome: str  # "not running" | "stale pid file" | "stopped" | "killed" | "still running"
    waited_s: float = 0.0


def stop_node(data_dir: Path, timeout_s: float, *, kill: bool = False) -> StopResult:
    """SIGTERM the node of ``data_dir`` and wait up to ``timeout_s`` for it to exit;
    with ``kill``, SIGKILL it after that."""
    pid = read_pid(data_dir)
    if pid is None:
        return StopResult(None, "not running")
    if not is_node_process(pid):
        pid_path(data_dir).unlink(missing_ok=True)
        return StopResult(pid, "stale pid file")
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout_s):
        return StopResult(pid, "stopped", time.monotonic() - started)
    if not kill:
        return StopResult(pid, "still running", time.monotonic() - started)
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, 5.0)
    pid_path(data_dir).unlink(missing_ok=True)
    return StopResult(pid, "killed", time.monotonic() - started)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(POLL_S)
    return not process_alive(pid)
