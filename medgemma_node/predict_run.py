"""`medgemma-node predict`'s run: which pairs to ask, the JSONL file, batches of pairs.

    with ResultsFile(out) as results:
        pairs = plan_pairs(find_files(paths, skip=out), questions, results.done)
        summary = run_pairs(pairs, answerer, results, on_pair)
    (answerers: medgemma_node/predict_answerers.py; the command: medgemma_node/predict.py)

Every (file, question) pair goes through the node's own path (inference/predict.py: the same
preprocessing, question templates, engine and parsing as ``POST /api/predict`` and received
studies), a batch of pairs at a time, and becomes one line of the JSONL file: file, question,
answer, findings, boxes (pixels of that file), image, model identity, timings and disclaimer;
or file, question and the error (a file that is not a readable DICOM, PNG or JPEG image, a
failed request). A failure is recorded and the run goes on.

The file is written a line at a time, flushed and fsynced; Ctrl-C stops the run after the
batch being answered is written (a second Ctrl-C at once), so an interrupted run leaves whole
lines; a rerun with the same ``--out`` skips the pairs answered
already and tries the failed ones again (their new line follows the old one: the last line of
a pair is its outcome). A line cut short by a crash is dropped when the file is reopened.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol

from core.errors import NodeError

Record = dict[str, Any]


class AnswerLanguage(StrEnum):
    """--language: the language of the template question and of reading the answer."""

    ZH = "zh"
    EN = "en"


class PredictRunError(NodeError):
    """The run cannot go on at all (the node refuses the token, has no predict endpoint)."""


@dataclass(frozen=True)
class Pair:
    file: Path
    question: str

    @property
    def key(self) -> tuple[str, str]:
        return str(self.file), self.question


def error_record(pair: Pair, message: str) -> Record:
    return {"file": str(pair.file), "question": pair.question, "error": message}


def answer_record(pair: Pair, result: dict[str, Any]) -> Record:
    return {"file": str(pair.file), "question": pair.question, **result}


# --------------------------------------------------------------------------- what to ask


def read_questions(questions: Sequence[str], questions_file: Path | None) -> list[str]:
    """--question values, then the file's lines (blank lines and "#" comments skipped);
    each question once, in order."""
    found = [q.strip() for q in questions]
    if questions_file is not None:
        lines = questions_file.read_text(encoding="utf-8").splitlines()
        found += [line.strip() for line in lines if not line.strip().startswith("#")]
    return list(dict.fromkeys(q for q in found if q))


def find_files(paths: Iterable[Path], skip: Path | None = None) -> list[Path]:
    """The files named and those under the folders named (sorted, hidden ones left out);
    a path that does not exist is kept, to be reported. ``skip``: the results file."""
    skipped = skip.resolve() if skip is not None else None
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            files += [p for p in found if not _hidden(p.relative_to(path))]
        else:
            files.append(path)
    unique = dict.fromkeys(files)
    return [f for f in unique if skipped is None or f.resolve() != skipped]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def plan_pairs(
    files: Sequence[Path], questions: Sequence[str], done: set[tuple[str, str]]
) -> list[Pair]:
    """Every (file, question) not answered yet, file by file (a file is read once)."""
    pairs = (Pair(file, question) for file in files for question in questions)
    return [pair for pair in pairs if pair.key not in done]


# --------------------------------------------------------------------------- the JSONL file


class ResultsFile:
    """The output: which pairs it answers already, and new lines written one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[tuple[str, str]] = set()
        self.earlier_errors = 0
        self._stream: IO[str] | None = None
        if path.exists():
            self._read_existing()

    def _read_existing(self) -> None:
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):  # a line cut short by a crash: dropped
            with self.path.open("r+b") as stream:
                stream.truncate(len(whole))
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or "file" not in record:
                continue
            key = (str(record["file"]), str(record.get("question", "")))
            if "error" in record:
                self.earlier_errors += 1
                self.done.discard(key)
            else:
                self.done.add(key)

    def __enter__(self) -> ResultsFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._stream is not None:
            self._stream.close()

    def write(self, record: Record) -> None:
        """One whole line, on disk before the next (Ctrl-C is taken between pairs: see
        ``_StopOnInterrupt``, so it never lands inside a write)."""
        assert self._stream is not None, "use ResultsFile as a context manager"
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._stream.write(line)
        self._stream.flush()
        os.fsync(self._stream.fileno())


class _StopOnInterrupt:
    """The first Ctrl-C (SIGINT) asks the run to stop after the pairs being answered are
    written; a second one stops at once (KeyboardInterrupt). A handler that only sets a flag
    is used rather than blocking the signal around each write: a process-wide SIGINT may be
    taken by any thread, and a mask set in one thread does not hold it off."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        except ValueError:  # not the main thread: Ctrl-C cannot reach this run anyway
            self._previous = None
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_interrupt(self, _signum: int, _frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


# --------------------------------------------------------------------------- the run


class Answerer(Protocol):
    """Answers a batch of pairs: one record per pair, same order."""

    batch_size: int

    def answer(self, pairs: Sequence[Pair]) -> list[Record]: ...


@dataclass
class RunSummary:
    answered: int = 0
    failed: int = 0
    interrupted: bool = False
    errors: dict[str, str] = field(default_factory=dict)  # file -> its first error


def run_pairs(
    pairs: Sequence[Pair],
    answerer: Answerer,
    results: ResultsFile,
    on_pair: Callable[[Pair], None] = lambda _pair: None,
) -> RunSummary:
    """Answer ``pairs`` in batches, writing each record as soon as it is known."""
    summary = RunSummary()
    with _StopOnInterrupt() as interrupt:
        try:
            for start in range(0, len(pairs), answerer.batch_size):
                batch = pairs[start : start + answerer.batch_size]
                for pair, record in zip(batch, answerer.answer(batch), strict=True):
                    results.write(record)
                    _count(summary, pair, record)
                    on_pair(pair)
                if interrupt.requested:
                    break
        except KeyboardInterrupt:
            pass
        summary.interrupted = interrupt.requested
    return summary


def _count(summary: RunSummary, pair: Pair, record: Record) -> None:
    if "error" in record:
        summary.failed += 1
        summary.errors.setdefault(str(pair.file), str(record["error"]))
    else:
        summary.answered += 1


def elapsed_s(started: float) -> float:
    return round(time.perf_counter() - started, 4)
