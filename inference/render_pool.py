"""Reading and rendering DICOM studies in processes of their own.

The inference worker builds batch N+1 while batch N generates. Reading a 7 MB radiograph and
applying its LUTs is Python and numpy work that holds the interpreter lock for much of its
time; in a thread of the generating process it slows the decode loop, which needs the lock
between its graph replays. ``RenderPool`` runs ``inference.preprocess.prepare_study`` in
spawned processes instead (no CUDA, no torch there) and hands back each study's
``PreparedStudy``: 8-bit RGB images of the padded square, shrunk to the model's input side
when the engine has one (``prepare_study``'s ``side``), else at the source's resolution (the
model's processor resizes them).

At full size those images are large (a 1955-pixel chest CR: 11.5 MB), and a process pool
returns results pickled through a pipe, unpickled by the receiving process's result thread
under the interpreter lock: a batch of 64 is ~730 MB through the pipe. So each image travels as
a file in shared memory (``/dev/shm`` where there is one) that the worker reads back into its
own array and deletes at once; only the file's name and the image's shape go through the pipe.
Shrunk to 896 x 896 in the render process, the image is 2.4 MB, and the worker's own work on it
(reading it back, the processor's conversions) shrinks alike: at full size that work, in the
thread that builds the next batch, held back the pieces a running batch takes at the start of a
burst (benchmarks/RESULTS.md). Files of a worker that died are removed when the next worker's
pool starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.processes import process_alive
from inference.preprocess import PreparedStudy, prepare_study

SHARED_DIR = Path("/dev/shm")
FILE_PREFIX = "medgemma-render-"


@dataclass(frozen=True)
class SharedImage:
    """One rendered image left in a shared-memory file for the worker (``take_study``)."""

    path: Path
    shape: tuple[int, ...]  # numpy shape of the uint8 pixels: (rows, columns[, channels])
    mode: str  # PIL mode


@dataclass(frozen=True)
class RenderedStudy:
    """What a render process returns: the study without its images, and where they are."""

    prepared: PreparedStudy  # ``images`` empty
    images: list[SharedImage]
    seconds: float


def shared_dir() -> Path:
    return SHARED_DIR if SHARED_DIR.is_dir() else Path(tempfile.gettempdir())


def _share_image(image: Image.Image) -> SharedImage:
    """Write the pixels to a new file named after the worker (this process's parent)."""
    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    path = shared_dir() / f"{FILE_PREFIX}{os.getppid()}-{uuid.uuid4().hex}"
    with path.open("xb") as file:
        pixels.tofile(file)
    return SharedImage(path, tuple(pixels.shape), image.mode)


def _read_image(shared: SharedImage) -> Image.Image:
    pixels = np.fromfile(shared.path, dtype=np.uint8).reshape(shared.shape)
    return Image.fromarray(pixels, mode=shared.mode)


def take_study(rendered: RenderedStudy) -> PreparedStudy:
    """The study with its images read back (every file deleted, even when one fails)."""
    images = []
    try:
        for shared in rendered.images:
            images.append(_read_image(shared))
    finally:
        for shared in rendered.images:
            shared.path.unlink(missing_ok=True)
    return dataclasses.replace(rendered.prepared, images=images)


def remove_orphans(owner_pid: int | None = None) -> int:
    """Delete shared image files of workers that no longer run (or, given ``owner_pid``, that
    worker's own: its leftovers at close); return how many."""
    removed = 0
    for path in shared_dir().glob(f"{FILE_PREFIX}*"):
        owner = path.name[len(FILE_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit():
            continue
        if (owner_pid is not None and int(owner) == owner_pid) or (
            owner_pid is None and not process_alive(int(owner))
        ):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def render_timed(paths: Sequence[Path], side: int | None = None) -> RenderedStudy:
    """``prepare_study`` (images shrunk to ``side``, the model's input side, when given) and
    the seconds it took (in the process that ran it), its images left in shared memory."""
    started = time.perf_counter()
    prepared = prepare_study(paths, side)
    shared: list[SharedImage] = []
    try:
        for image in prepared.images:
            shared.append(_share_image(image))
    except BaseException:
        for written in shared:
            written.path.unlink(missing_ok=True)
        raise
    without = dataclasses.replace(prepared, images=[])
    return RenderedStudy(without, shared, time.perf_counter() - started)


def _ready() -> int:
    return os.getpid()


class RenderPool:
    """``processes`` spawned processes that run ``render_timed``."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        with contextlib.suppress(OSError):
            remove_orphans()
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

    def submit(self, paths: Sequence[Path], side: int | None = None) -> Future[RenderedStudy]:
        try:
            return self._executor.submit(render_timed, list(paths), side)
        except BrokenProcessPool:
            # A process died (a study that crashes the decoder fails its job, retried up to
            # max_attempts): start new ones for the others.
            self._executor.shutdown(wait=False)
            self._executor = self._new_executor()
            return self._executor.submit(render_timed, list(paths), side)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError):  # results rendered but never taken
            remove_orphans(owner_pid=os.getpid())
