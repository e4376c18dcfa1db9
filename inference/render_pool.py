"""Reading and rendering DICOM studies in processes of their own.

The inference worker builds batch N+1 while batch N generates. Reading a 7 MB radiograph,
applying its LUTs and shrinking it to the model's input is Python and numpy work that holds
the interpreter lock for much of its time; in a thread of the generating process it slows the
decode loop, which needs the lock between its graph replays. ``RenderPool`` runs
``inference.preprocess.prepare_study`` in spawned processes instead (no CUDA, no torch there)
and hands back each study's ``PreparedStudy`` (the images as 8-bit RGB at the model's size).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from inference.preprocess import PreparedStudy, prepare_study


def render_timed(paths: Sequence[Path]) -> tuple[PreparedStudy, float]:
    """``prepare_study`` and the seconds it took (in the process that ran it)."""
    started = time.perf_counter()
    prepared = prepare_study(paths)
    return prepared, time.perf_counter() - started


def _ready() -> int:
    return os.getpid()


class RenderPool:
    """``processes`` spawned processes that run ``render_timed``."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._executor = self._new_executor()
        self._warm_ups: list[Future[int]] = []

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes, mp_context=multiprocessing.get_context("spawn")
        )

    def warm_up(self) -> None:
        """Start every process now (imports) rather than during the first batch; returns at once."""
        self._warm_ups = [self._executor.submit(_ready) for _ in range(self.processes)]

    @property
    def ready(self) -> bool:
        """Every process has started (until then the worker renders in its own thread)."""
        return all(future.done() for future in self._warm_ups)

    def submit(self, paths: Sequence[Path]) -> Future[tuple[PreparedStudy, float]]:
        try:
            return self._executor.submit(render_timed, list(paths))
        except BrokenProcessPool:
            # A process died (a study that crashes the decoder fails its job, retried up to
            # max_attempts): start new ones for the others.
            self._executor.shutdown(wait=False)
            self._executor = self._new_executor()
            return self._executor.submit(render_timed, list(paths))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
