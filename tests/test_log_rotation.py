"""One process rotates the node's log file; the processes it starts append to it and follow its
rotations (medgemma_node/logs.py), so no line is lost when several processes write one file.
The child is a real process started with the environment `serve` gives its children."""

from __future__ import annotations

import logging
import logging.handlers
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medgemma_node.logs import LOG_OWNER_ENV, child_log_env, setup_logging
from peers.net import wait_for

CHILD = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    from medgemma_node.logs import setup_logging
    log_file, work = Path(sys.argv[1]), Path(sys.argv[2])
    setup_logging("INFO", log_file)
    handler = logging.getLogger().handlers[-1]
    assert type(handler).__name__ == "WatchedFileHandler", handler
    log = logging.getLogger("child")
    for index in range(50):
        log.info("child line %d", index)
    (work / "half").touch()
    for _ in range(600):  # the owner rotates meanwhile (at most 60 s)
        if (work / "rotated").exists():
            break
        time.sleep(0.1)
    for index in range(50, 100):
        log.info("child line %d", index)
    """
)


@pytest.fixture
def owner(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    """This process owns the log file (no owner above it)."""
    monkeypatch.delenv(LOG_OWNER_ENV, raising=False)


def test_a_child_appends_and_follows_the_owners_rotation(tmp_path: Path, owner: None) -> None:
    log_file = tmp_path / "logs" / "node.log"
    setup_logging("INFO", log_file)
    [owner_handler] = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.handlers.BaseRotatingHandler)
    ]
    env = child_log_env()
    assert env[LOG_OWNER_ENV] == str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log_file), str(tmp_path)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (tmp_path / "half").exists(), 60, message="the child's first lines")
        logging.getLogger("owner").info("owner before rotating")
        owner_handler.doRollover()  # as when the file passes its size limit
        logging.getLogger("owner").info("owner after rotating")
        (tmp_path / "rotated").touch()
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
    current = log_file.read_text(encoding="utf-8")
    rotated = log_file.with_name("node.log.1").read_text(encoding="utf-8")
    for index in range(100):
        expected = f"child line {index}\n"
        in_file = current if index >= 50 else rotated  # the new file after the rotation
        assert (current + rotated).count(expected) == 1 and expected in in_file
    assert "owner before rotating" in rotated and "owner after rotating" in current


def test_processes_a_command_starts_itself_do_not_rotate(tmp_path: Path, owner: None) -> None:
    """The worker's render and store processes are set up with ``rotate=False``: without
    `serve` above them the worker owns the file, and they must not rotate it either."""
    setup_logging("INFO", tmp_path / "node.log", rotate=False)
    handlers = logging.getLogger().handlers
    assert any(isinstance(h, logging.handlers.WatchedFileHandler) for h in handlers)
    assert not any(isinstance(h, logging.handlers.BaseRotatingHandler) for h in handlers)
