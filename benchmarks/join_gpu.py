"""What rows joining a running batch cost, against the same studies run as one batch, through
the node's engine path (``TransformersEngine`` with the fast path attached as at node start).

At the start of a burst the node's first batch starts with the studies that are due and takes
the rest in pieces as the next batch prepares them (inference/decode_joins.py). On one H200 a
first batch of 64 built that way took 4.2-5.0 s where a batch of 64 takes 2.96 s
(benchmarks/RESULTS.md). Here every piece is prepared before the batch starts, so nothing
waits for a render: ``generate_prepared`` of the whole batch, and ``generate_joining`` of
``--start`` studies with the rest offered in pieces of each ``--pieces`` size (a piece joins at
the first check where it fits: one a check, as when they come ready one after the other, or
all those ready at once, in one prompt pass; or one a check with the batch holding its
first decode step until they have all joined; or held while another thread prepares the
pieces, as the node's build thread does, so its prompt passes share the host with that work).
The clock of that last case starts before the first piece is prepared. What the joined runs
take beyond the whole batch is the cost of joining itself: the pieces' own prompt passes,
the moves to larger buckets, and the steps the rows that joined later add.

    python -m benchmarks.join_gpu --batch 64 --start 1 --pieces 8 --runs 2
    python -m benchmarks.join_gpu --tiny --batch 8 --start 1 --pieces 2 --new-tokens 8  # CPU
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.engine_gpu import IMAGE_4B, IMAGE_TINY, load_engine, requests_for
from inference.engine import GenerationRequest, PreparedBatch
from inference.loader import attach_fast_path
from inference.transformers_engine import TransformersEngine


class ReadyPieces:
    """A ``JoinFeed`` (inference/engine.py) whose pieces were all prepared beforehand; with
    ``one_a_check`` it hands over one piece a check (every other call), as when the pieces
    come ready one after the other during a burst; with ``held`` it says they are coming, so
    the batch holds its first step for them (inference/decode_joins.py)."""

    def __init__(self, pieces: list[PreparedBatch], one_a_check: bool, held: bool) -> None:
        self.pieces = list(pieces)
        self.one_a_check = one_a_check
        self.held = held
        self.taken = 0
        self._gave = False

    def take(self, rows: int, accept: Callable[[PreparedBatch], bool]) -> PreparedBatch | None:
        if self.one_a_check and self._gave:
            self._gave = False  # the next check's call gets the next piece
            return None
        for index, piece in enumerate(self.pieces):
            if len(piece.requests) <= rows and accept(piece):
                self.taken += len(piece.requests)
                self._gave = True
                return self.pieces.pop(index)
        return None

    def closing(self, seconds: float) -> None:
        """The batch takes no more rows (nothing to stop here)."""

    def coming(self) -> bool:
        return self.held and bool(self.pieces)


class PreparingPieces(ReadyPieces):
    """Pieces prepared in a thread of their own while the batch holds for them, one after the
    other (each ``engine.prepare``: the processor and the copy to the device), as the node's
    next batch is built during a burst: a piece is handed over once it is prepared."""

    def __init__(self, engine: TransformersEngine, parts: list[list[GenerationRequest]]) -> None:
        super().__init__([], one_a_check=False, held=True)
        self._lock = threading.Lock()
        self._left = len(parts)
        self._thread = threading.Thread(target=self._prepare, args=(engine, parts), daemon=True)
        self._thread.start()

    def _prepare(self, engine: TransformersEngine, parts: list[list[GenerationRequest]]) -> None:
        for part in parts:
            prepared = engine.prepare(part)
            with self._lock:
                self.pieces.append(prepared)
                self._left -= 1

    def take(self, rows: int, accept: Callable[[PreparedBatch], bool]) -> PreparedBatch | None:
        with self._lock:
            return super().take(rows, accept)

    def coming(self) -> bool:
        with self._lock:
            return self._left > 0 or bool(self.pieces)

    def join(self) -> None:
        self._thread.join()


class JoinLog(logging.Handler):
    """The decode loop's summary of each batch that took rows (groups, last step, steps)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def synchronized() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


HOW = [  # (what, one piece a check, held for the pieces, pieces prepared meanwhile)
    ("one a check", True, False, False),
    ("all ready", False, False, False),
    ("one a check, held before the first step", True, True, False),
    ("held, each piece prepared meanwhile in another thread", False, True, True),
]


def time_whole(
    engine: TransformersEngine, requests: list[GenerationRequest], runs: int
) -> list[float]:
    seconds = []
    for _ in range(runs):
        batch = engine.prepare(requests)
        started = synchronized()
        engine.generate_prepared(batch)
        seconds.append(synchronized() - started)
    return seconds


def time_joined(
    engine: TransformersEngine,
    requests: list[GenerationRequest],
    start: int,
    piece: int,
    runs: int,
    one_a_check: bool,
    held: bool,
    preparing: bool = False,
) -> tuple[list[float], int]:
    """Seconds of each run, and how many studies joined in the last one."""
    seconds, joined = [], 0
    for _ in range(runs):
        first = engine.prepare(requests[:start])
        rest = requests[start:]
        parts = [rest[k : k + piece] for k in range(0, len(rest), piece)]
        feed: ReadyPieces
        if preparing:
            started = synchronized()
            feed = PreparingPieces(engine, parts)
        else:
            feed = ReadyPieces([engine.prepare(part) for part in parts], one_a_check, held)
            started = synchronized()
        results = engine.generate_joining(first, feed)
        seconds.append(synchronized() - started)
        if isinstance(feed, PreparingPieces):
            feed.join()
        joined = feed.taken
        if len(results) != start + joined:
            raise RuntimeError(f"{len(results)} results for {start} + {joined} studies")
    return seconds, joined


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--start", type=int, default=1, help="studies the batch starts with")
    parser.add_argument("--pieces", default="8", help="piece sizes to try, e.g. 8,16")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model (development)")
    args = parser.parse_args()
    joins = JoinLog()
    logging.getLogger("inference.decode_joins").addHandler(joins)
    logging.getLogger("inference.decode_joins").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="join-") as directory:
        engine, settings = load_engine(Path(directory), args.tiny, args.batch, args.new_tokens)
        attach_fast_path(engine, settings)
        requests = requests_for(args.batch, args.new_tokens, IMAGE_TINY if args.tiny else IMAGE_4B)
        time_whole(engine, requests, 1)  # warm: the processor's copies, the first prefill
        whole = statistics.median(time_whole(engine, requests, args.runs))
        print(f"whole batch of {args.batch}: {whole:.3f} s", flush=True)
        for piece in (int(size) for size in args.pieces.split(",")):
            for how, one_a_check, held, preparing in HOW:
                joins.lines.clear()
                seconds, joined = time_joined(
                    engine, requests, args.start, piece, args.runs, one_a_check, held, preparing
                )
                median = statistics.median(seconds)
                print(
                    f"{args.start} + {joined} joined in pieces of {piece}, {how}: {median:.3f} s "
                    f"({median - whole:+.3f} s, {median / whole:.2f}x); {joins.lines[-2:]}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
