"""`medgemma-node predict` as a user runs it: a folder with the real radiographs RG1_UNCI and
RG3_UNCI (pydicom-data), a PNG and a file that is no image, two questions, the tiny random demo
model through the real loading path (every answer marked as a TEST MODEL); and the same through
a running node's API (``--api``), when the node offers POST /api/predict.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from inference.demo_model import write_demo_model
from peers.dicom_files import testdata
from peers.net import free_port, wait_for
from peers.node_process import REPO, NodeProcess, run_cli, write_toml

pytestmark = pytest.mark.slow

QUESTIONS = ["Is there a nodule?", "这张片子有骨折吗？"]
# (columns, rows) of each image: boxes and sizes are in pixels of the file.
IMAGE_SIZES = {"RG1_UNCI.dcm": (1841, 1955), "RG3_UNCI.dcm": (1760, 1760), "hand.png": (120, 80)}
NOT_AN_IMAGE = "notes.txt"


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo-model")
    write_demo_model(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "cases"
    (images / "xr").mkdir(parents=True)
    shutil.copy(testdata("RG1_UNCI.dcm"), images / "xr" / "RG1_UNCI.dcm")
    shutil.copy(testdata("RG3_UNCI.dcm"), images / "xr" / "RG3_UNCI.dcm")
    Image.new("L", (120, 80), 90).save(images / "hand.png")
    (images / NOT_AN_IMAGE).write_text("follow-up in 3 months\n", encoding="utf-8")
    return images


def local_config(tmp_path: Path, weights: Path, max_batch: int = 4) -> Path:
    sections = {
        "storage": {"data_dir": str(tmp_path / "data")},
        "model": {
            "model_path": str(weights),
            "max_new_tokens": 8,
            "max_batch": max_batch,
            "fast_path": False,
        },
        "interactive": {"max_new_tokens": 6},
    }
    return write_toml(tmp_path / "node.toml", sections)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def by_pair(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(Path(r["file"]).name, r["question"]): r for r in records}


def check_answers(records: list[dict[str, Any]]) -> None:
    """One line per (file, question); the answers as the node gives them; the bad file's
    error."""
    pairs = by_pair(records)
    names = [*IMAGE_SIZES, NOT_AN_IMAGE]
    assert len(records) == len(pairs) == len(names) * len(QUESTIONS)
    assert set(pairs) == {(name, q) for name in names for q in QUESTIONS}
    for (name, _question), record in pairs.items():
        if name == NOT_AN_IMAGE:
            assert "not a PNG, JPEG or DICOM" in record["error"] and "answer" not in record
            continue
        assert "error" not in record, record
        assert isinstance(record["answer"], str)
        assert (record["image"]["width"], record["image"]["height"]) == IMAGE_SIZES[name]
        assert record["model"]["is_test_model"] is True
        assert record["disclaimer"].startswith("TEST MODEL") and "physician" in record["disclaimer"]
        assert isinstance(record["findings"], list) and isinstance(record["boxes"], list)
        assert 0 < record["timings"]["new_tokens"] <= 6


def predict(folder: Path, out: Path, *options: str, timeout: float = 600) -> Any:
    questions = [arg for q in QUESTIONS for arg in ("--question", q)]
    return run_cli("predict", str(folder), *questions, "--out", str(out), *options, timeout=timeout)


def test_a_folder_two_questions_the_bad_file_reported_then_resumed(
    tmp_path: Path, folder: Path, demo_weights: Path
) -> None:
    config = local_config(tmp_path, demo_weights)
    out = tmp_path / "results" / "answers.jsonl"
    first = predict(folder, out, "--config", str(config), "--max-new-tokens", "6")
    assert first.returncode == 1, first.stderr  # some pairs failed: the bad file
    check_answers(lines(out))
    assert "6 answered, 2 failed (1 files)" in first.stderr
    assert NOT_AN_IMAGE in first.stderr
    answered = {k: v for k, v in by_pair(lines(out)).items() if "error" not in v}

    # A run cut short by a crash left half a line: dropped; the answered pairs are skipped,
    # the failed ones asked again.
    with out.open("a", encoding="utf-8") as stream:
        stream.write('{"file": "cut sh')
    again = predict(folder, out, "--config", str(config), "--max-new-tokens", "6")
    assert again.returncode == 1, again.stderr
    assert "2 to ask, 6 answered already" in again.stderr
    records = lines(out)
    assert len(records) == 10 and records[:8] == lines(out)[:8]
    assert {(Path(r["file"]).name, r["question"]) for r in records[8:]} == {
        (NOT_AN_IMAGE, q) for q in QUESTIONS
    }
    assert {k: v for k, v in by_pair(records[:8]).items() if "error" not in v} == answered


def test_questions_from_a_file_and_nothing_to_ask(tmp_path: Path) -> None:
    questions = tmp_path / "questions.txt"
    questions.write_text("# none yet\n\n", encoding="utf-8")
    result = run_cli("predict", str(tmp_path), "--questions-file", str(questions))
    assert result.returncode == 2 and "no question" in result.stderr


def test_ctrl_c_leaves_whole_lines(tmp_path: Path, folder: Path, demo_weights: Path) -> None:
    config = local_config(tmp_path, demo_weights, max_batch=1)
    out = tmp_path / "answers.jsonl"
    questions = [arg for n in range(12) for arg in ("-q", f"Question {n}: any finding?")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medgemma_node.cli", "predict", str(folder), *questions,
         "--out", str(out), "--config", str(config), "--max-new-tokens", "4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 300, interval=0.05)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = lines(out)  # every line whole JSON
    assert 0 < len(records) < 4 * 12, "interrupted before the end"
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr


# --------------------------------------------------------------------------- through the API


@pytest.fixture
def node(tmp_path: Path, demo_weights: Path) -> Iterator[NodeProcess]:
    sections = {
        "model": {"model_path": str(demo_weights), "max_new_tokens": 8, "fast_path": False},
        "interactive": {"max_new_tokens": 6},
        "api": {"enabled": True, "port": free_port()},
    }
    node = NodeProcess(tmp_path / "node", sections).start()
    try:
        yield node
    finally:
        node.terminate()


def test_the_same_through_a_running_node(tmp_path: Path, folder: Path, node: NodeProcess) -> None:
    added = run_cli("api", "add-user", "reader", "--role", "radiologist", "--config",
                    str(node.config_path))  # fmt: skip
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    out = tmp_path / "api.jsonl"
    first = predict(folder, out, "--api", node.api_url, "--token", token)
    assert first.returncode == 1, f"{first.stderr}\n{node.log_text()[-3000:]}"
    check_answers(lines(out))
    again = predict(folder, out, "--api", node.api_url, "--token", token)
    assert "2 to ask, 6 answered already" in again.stderr
    refused = predict(folder, tmp_path / "refused.jsonl", "--api", node.api_url, "--token", "x")
    assert refused.returncode == 1 and "refused the token (401)" in refused.stderr
