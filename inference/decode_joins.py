"""Rows that join a batch while it decodes (inference/fast_decode.py).

A batch costs about 0.75 s of decode steps whatever its size, plus about 36 ms a study (one
H200, random-weight MedGemma-4B, 256 new tokens: benchmarks/RESULTS.md). At the start of a
burst the worker could only run the first study alone and make the next batch wait for it,
with the GPU idle: 640 radiographs sent at once came out at 0.83-0.85x the engine's pace.
Here the studies that come due while a batch decodes join it between two decode steps, in the
rows its bucket leaves free, so the fixed cost is paid once for them.

How a row joins without a decode step of its own: every row of a state writes its next KV
column at the same ``column``; a row attends only to the columns from its ``starts``, and its
RoPE position is its own. A joining prompt of ``n`` tokens is prefilled by the model's own
forward (as ``generate`` does) and its KV is stored in columns ``column - n`` to
``column - 1`` of a free row, ``starts`` at its first real token: the next step then extends
it exactly as a batch started with it would, its positions counted from its own first token.
What it needs: a prompt no longer than the column the batch has reached (radiographs of one
prompt group are within a few tokens of each other), and room for its new tokens before the
state's end. So a batch that takes rows moves to a state of the join length (the prompt and
twice the new tokens at warm-up, within the short buffers) and, when the rows outgrow its
bucket, to a larger bucket: its KV and step inputs are copied there (a few milliseconds).

Each group of rows keeps the step at which it joined: its tokens are ``out`` from that step
on, and once it has its ``max_new_tokens`` it is marked done (the tokens a row makes past its
end, until the next check, are cut).

When rows may join: every step a row joins late is a step the whole batch runs longer, and
its prompt runs in a small prefill of its own. That pays when the alternative is a small batch
of its own with the GPU otherwise waiting (the start of a burst, a batch that started at most
half full), and costs when the next batch would be full anyway: on one H200 a node whose
nearly full batches took pieces of 8 in their first 32 steps kept 0.92x the engine's pace
with the queue full, against 0.97-0.98x without (benchmarks/RESULTS.md). So only a batch that
started at most half full takes rows during its steps, its first rows' ``max_new_tokens``
of them (half of them was too short for the first pieces of a burst to be ready): no answer
waits more than about twice a batch's time. A batch that started fuller, but not full, takes
rows only before its first step (the hold below), where they cost it no step: studies that
came due just after such a batch began otherwise ran after it as a short batch of their own,
at the end of a 640-CR burst an 11th batch of 2 rows (0.99 s) or 20 (1.73 s) on an H200
(``join_window``). Once it takes no more rows it tells the source when it will end
(``closing``; its steps timed between two checks without a prefill), so the worker's next
batch stops growing in time for it (inference/prefetch.py, ``TopUp.ends_in``).

Either batch first holds its decode steps while more rows are on their way (``coming``): the
rows of a static batch all end together, 256 steps after the last row joined, so steps run
before the last join only lengthen the batch, while prompt passes made during the hold are
work the batch needs anyway. Held until full, the batch ends one prompt pass and
``max_new_tokens`` steps after its last rows came ready, the earliest it can. The hold ends
when the rows are full, when nothing is on its way, when no rows came for ``HOLD_GAP_S``
(what is on its way may be of another kind, which never joins), and when none are ready
once ``HOLD_S`` has passed (about the window's 256 steps on an H200); rows still coming then
join during the window, if the batch has one. Rows ready at each ask keep the hold going past
``HOLD_S``: each ask then adds rows, so the rows' count bounds it. On one H200 the first
batch of a 640-CR burst held 2.1-2.4 s for its 64 rows, most of it their prompt passes
(benchmarks/RESULTS.md).

A joining prompt pass runs one of the row counts ``join_pass_sizes`` gives (1 to 8, then 16,
32 and 64 for larger takes), and the fast path runs one pass of each such row count (and one
of a full batch) at load (``warm_pass_shapes``). Why: on an
H200, PyTorch's attention runs through cuDNN, which builds an execution plan the first time
it meets a shape (the vision tower's: its image count; the text's: rows and prompt length),
50-120 ms each, in the generating thread. A hold takes whatever rows are ready, so each of
its passes was a new shape: a pass of 6 rows took 313 ms in the node's first batch against
147 ms once its plans existed (benchmarks/prompt_shapes.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from inference import fast_buffers
from inference.fast_buffers import DecodeState, image_offsets

if TYPE_CHECKING:
    from inference.fast_decode import FastGreedyGenerator

log = logging.getLogger(__name__)

HOLD_S = 2.0  # after this a batch stops holding its first step for rows not yet ready
HOLD_GAP_S = 0.5  # ... and for rows that do not come: a burst's pieces come every ~0.2 s
HOLD_POLL_S = 0.005  # between two asks while holding (the GPU is idle meanwhile)
# The row counts a joining prompt pass runs, so those warmed at load are all a join meets
# (module docstring): every count up to JOIN_PASS_ROWS (a burst's pieces are of 8 studies at
# most, inference/batch_pieces.py MAX_PIECE), and LARGER_JOIN_PASSES for a take of several
# pieces: the first batch of a burst at max_batch 256 took 56 and 96 rows at once, which in
# passes of 8 paid each pass's fixed cost 7 and 12 times (benchmarks/RESULTS.md).
JOIN_PASS_ROWS = 8
LARGER_JOIN_PASSES = (16, 32, 64)


class RowSource(Protocol):
    """Where the rows that join a running batch come from (the engine: inference/
    engine_joins.py)."""

    def take(self, rows: int, prompt_len: int) -> Mapping[str, torch.Tensor] | None:
        """The inputs of at most ``rows`` rows, prompts at most ``prompt_len`` tokens long
        (processor tensors, padded on the left), now part of the batch; or None."""
        ...

    def closing(self, seconds: float) -> None:
        """No more rows will join; the batch ends in about ``seconds``."""
        ...

    def coming(self) -> bool:
        """More rows are on their way (a batch about to decode may wait for them)."""
        ...


def join_window(rows: int, max_batch: int, max_new_tokens: int) -> int:
    """The first ``produced`` count at which a batch that started with ``rows`` rows takes no
    more (module docstring): its first rows' ``max_new_tokens`` steps when it started at most
    half full, else 2, so rows join only where ``produced`` is 1: before the first step."""
    return max_new_tokens if 2 * rows <= max_batch else 2


class HoldClock:
    """Where a hold's time went, for its log line: the rows each ask took and their prompt
    passes (their GPU time from CUDA events, read once the hold ends, so no pass waits for a
    sync of its own), the asks that found no rows, and the waits between them."""

    def __init__(self, device: torch.device, timed: bool) -> None:
        self._cuda = timed and device.type == "cuda"  # events only for a line that is logged
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._began: tuple[float, torch.cuda.Event | None] = (0.0, None)
        self.take_rows: list[int] = []  # the rows of each ask that took any, in order
        self.passing_s = 0.0  # asks that took rows: the host's part (tensors taken, launches)
        self.asking_s = 0.0  # asks that found none
        self.waiting_s = 0.0

    def ask(self) -> None:
        """An ask for rows begins (a prompt pass, when it takes some)."""
        event = torch.cuda.Event(enable_timing=True) if self._cuda else None
        if event is not None:
            event.record()
        self._began = (time.perf_counter(), event)

    def asked(self, rows: int) -> None:
        """The ask ended, having taken ``rows`` rows (a prompt pass when more than none)."""
        began, event = self._began
        seconds = time.perf_counter() - began
        if not rows:
            self.asking_s += seconds
            return
        self.passing_s += seconds
        self.take_rows.append(rows)
        if event is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((event, end))

    def wait(self, seconds: float) -> None:
        began = time.perf_counter()
        time.sleep(seconds)
        self.waiting_s += time.perf_counter() - began

    def summary(self) -> str:
        gpu = ""
        each = "/".join(str(rows) for rows in self.take_rows)
        if self._events:
            self._events[-1][1].synchronize()
            pass_ms = [start.elapsed_time(end) for start, end in self._events]
            gpu = f"{sum(pass_ms) / 1000:.3f} s on the GPU, "
            timed = zip(self.take_rows, pass_ms, strict=True)  # both kept for every take
            each = ", ".join(f"{rows} in {ms:.0f} ms" for rows, ms in timed)
        return (
            f"{len(self.take_rows)} takes of rows, their prompt passes {gpu}"
            f"{self.passing_s:.3f} s on the host; "
            f"{self.asking_s:.3f} s asking for none, {self.waiting_s:.3f} s waiting; "
            f"rows each took: {each}"
        )


@dataclass
class JoinedRows:
    """A group of rows of the state, and the step (index in ``out``) of its first token."""

    first_row: int
    rows: int
    first_step: int
    finished: bool = False
    tokens: torch.Tensor | None = None  # decoded apart (rows the state cannot hold)


class RowJoins:
    """One batch's decode loop with rows joining it (see the module docstring)."""

    def __init__(
        self,
        generator: FastGreedyGenerator,
        source: RowSource,
        max_new_tokens: int,
        eos: list[int],
        pad: int,
    ) -> None:
        self.gen = generator
        self.source = source
        self.max_new_tokens = max_new_tokens
        self.eos, self.pad = eos, pad
        self.groups: list[JoinedRows] = []
        self.used = 0  # rows of the state in use
        self.prompt_len = 0
        self.window = 0  # rows join before this step (see the module docstring)
        self._step_s = 0.0  # a decode step's time, measured between checks without a join
        self._checked: tuple[float, int] | None = None  # (time, produced) at the last check
        self._created = time.monotonic()  # before the batch's own prompt pass

    def reserve(self, rows: int) -> None:
        """The states the batch may move to, built before any KV is loaded: capturing a
        graph runs the step on the arena, which would overwrite the batch's KV."""
        for bucket in self.gen.buckets:
            if bucket >= rows:
                self.gen._state(bucket, self.gen.join_length)

    def run(self, state: DecodeState, rows: int, prompt_len: int) -> torch.Tensor:
        """Decode the ``rows`` rows loaded into ``state`` and every row that joins; their new
        tokens in joining order, [rows + joined, <= max_new_tokens] on the CPU."""
        gen = self.gen
        self.used, self.prompt_len = rows, prompt_len
        self.window = join_window(rows, self.gen.max_batch, self.max_new_tokens)
        self.groups = [JoinedRows(0, rows, 0)]
        state = self._hold(state)
        produced = 1
        while produced < self._end():
            if (produced - 1) % gen.check_every == 0:
                state = self._admit(state, produced)
                self._finish_groups(state, produced)
                self._time_steps(produced)
                if bool(state.done[: self.used].all()):
                    break
                if gen._between_steps is not None:
                    gen._between_steps()
            gen._run_step(state)
            produced += 1
        if len(self.groups) > 1:
            log.info(
                "batch of %d rows: %d joined in %d groups, the last at step %d; %d steps",
                rows, sum(g.rows for g in self.groups[1:]), len(self.groups) - 1,
                self.groups[-1].first_step, produced,
            )  # fmt: skip
        return self._tokens(state, produced)

    def _hold(self, state: DecodeState) -> DecodeState:
        """Rows taken in before the first decode step, while more are on their way (see the
        module docstring): they join at step 0, as if the batch had started with them."""
        gen = self.gen
        start = last = time.monotonic()
        logged = log.isEnabledFor(logging.INFO)
        clock = HoldClock(gen.device, timed=logged)
        while self.used < gen.max_batch and self.source.coming():
            used = self.used
            clock.ask()
            state = self._admit(state, 1)
            clock.asked(self.used - used)
            now = time.monotonic()
            if self.used > used:
                last = now
            elif now - start > HOLD_S or now - last > HOLD_GAP_S:
                break
            else:
                if gen._between_steps is not None:
                    gen._between_steps()  # the lane's questions do not wait for the hold
                clock.wait(HOLD_POLL_S)
        if logged and self.used > self.groups[0].rows:  # the summary waits for the last pass
            log.info(
                "batch held %.3f s for %d rows, from %.3f s after it began: %s",
                time.monotonic() - start, self.used, start - self._created, clock.summary(),
            )  # fmt: skip
        return state

    def _time_steps(self, produced: int) -> None:
        """Time the steps since the last check (its stop test syncs with the device), unless
        rows joined here; once no more rows can join, tell the source when the batch ends."""
        now = time.perf_counter()
        last, self._checked = self._checked, (now, produced)
        joined_now = self.groups[-1].first_step == produced - 1
        if last is not None and produced > last[1] and not joined_now:
            self._step_s = (now - last[0]) / (produced - last[1])
        closed = produced >= self.window or self.used == self.gen.max_batch
        if self.window and closed and self._step_s > 0:
            self.window = 0  # said once; no row joins from here on
            self.source.closing((self._end() - produced) * self._step_s)

    def _end(self) -> int:
        return max(g.first_step + self.max_new_tokens for g in self.groups if g.tokens is None)

    def _finish_groups(self, state: DecodeState, produced: int) -> None:
        """Rows that have all their tokens stop (pad from here on)."""
        for group in self.groups:
            if not group.finished and produced >= group.first_step + self.max_new_tokens:
                state.done[group.first_row : group.first_row + group.rows] = True
                group.finished = True

    def _admit(self, state: DecodeState, produced: int) -> DecodeState:
        """Rows from the source into free rows of the state (moved to a larger one first)."""
        gen = self.gen
        column = self.prompt_len + produced - 1  # where the next step writes
        free = gen.max_batch - self.used
        room = column + self.max_new_tokens - 1 <= gen.join_length
        if free < 1 or produced >= self.window or not room:
            return state
        inputs = self.source.take(free, column)
        if inputs is None:
            return state
        batch = {k: gen._to_device(v) for k, v in inputs.items() if torch.is_tensor(v)}
        rows, length = batch["input_ids"].shape
        if not 0 < rows <= free or length > column:
            raise ValueError(f"{rows} rows of {length} tokens cannot join {free} rows at {column}")
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        offsets = image_offsets(batch, gen._image_token_id, gen._tokens_per_image)
        if offsets is None or not gen._fits(batch, self.max_new_tokens):
            # Decoded apart now (as any batch the static buffers cannot take): never lost.
            tokens = gen._fallback(batch, self.max_new_tokens, self.eos, self.pad, False)
            self.groups.append(JoinedRows(-1, rows, 0, True, tokens))
            return state
        state = self._grown(state, self.used + rows, column, produced)
        self._load_rows(state, batch, offsets, column, produced)
        return state

    def _load_rows(
        self,
        state: DecodeState,
        batch: dict[str, torch.Tensor],
        offsets: list[int],
        column: int,
        produced: int,
    ) -> None:
        """The joining rows' prompt KV ends at ``column``; their first token goes to out
        column ``produced - 1``, where the next step's input of every row is."""
        gen, first_row = self.gen, self.used
        rows = batch["input_ids"].shape[0]
        first = gen._prefill_passes(
            batch,
            offsets,
            state,
            first_row=first_row,
            end=column,
            passes=join_passes(rows, join_pass_sizes(gen.max_batch)),
        )
        counts = batch["attention_mask"].long().sum(-1)
        part = slice(first_row, first_row + rows)
        state.tokens[part] = first
        state.positions[part] = counts
        state.starts[part] = column - counts
        state.done[part] = (first[:, None] == gen._eos[None, :]).any(-1)
        state.out[part, produced - 1] = first
        self.groups.append(JoinedRows(first_row, rows, produced - 1))
        self.used += rows

    def _grown(self, state: DecodeState, rows: int, column: int, produced: int) -> DecodeState:
        """``state``, or the join-length state of the smallest bucket holding ``rows`` rows
        with the batch copied in (both are views of one arena, so each layer's KV goes through
        a copy of its own: the two may overlap)."""
        gen = self.gen
        bucket = next(b for b in gen.buckets if b >= rows)
        if bucket == state.rows and state.length == gen.join_length:
            return state
        grown = gen._state(bucket, gen.join_length)  # reserved: no capture here
        used = self.used
        for old, new in zip(state.keys + state.values, grown.keys + grown.values, strict=True):
            new[:used, :, :column].copy_(old[:used, :, :column].clone())
        for name in ("tokens", "positions", "starts", "done"):
            getattr(grown, name)[:used] = getattr(state, name)[:used]
        grown.out[:used, :produced] = state.out[:used, :produced]
        grown.tokens[used:] = self.pad
        grown.positions[used:] = 0
        grown.starts[used:] = column  # free rows attend only to what they write themselves
        grown.done[used:] = True
        grown.column.copy_(state.column)
        grown.step.copy_(state.step)
        return grown

    def _tokens(self, state: DecodeState, produced: int) -> torch.Tensor:
        parts = []
        for group in self.groups:
            if group.tokens is not None:
                parts.append(group.tokens)
                continue
            rows = slice(group.first_row, group.first_row + group.rows)
            end = min(produced, group.first_step + self.max_new_tokens)
            tokens = state.out[rows, group.first_step : end].to("cpu", copy=True)
            parts.append(fast_buffers.trim_after_eos(tokens, self.eos))
        return fast_buffers.concat_padded(parts, self.pad)


def join_pass_sizes(max_batch: int) -> list[int]:
    """The row counts a joining prompt pass runs at ``max_batch`` (see JOIN_PASS_ROWS)."""
    larger = (rows for rows in LARGER_JOIN_PASSES if rows <= max_batch)
    return sorted({*range(1, min(JOIN_PASS_ROWS, max_batch) + 1), *larger})


def join_passes(rows: int, sizes: Sequence[int]) -> list[int]:
    """``rows`` as prompt passes of the warmed ``sizes`` (1 among them), largest first."""
    passes = []
    while rows > 0:
        size = max(size for size in sizes if size <= rows)
        passes.append(size)
        rows -= size
    return passes


def warm_pass_shapes(
    generator: FastGreedyGenerator, sample: Mapping[str, torch.Tensor], max_batch: int
) -> None:
    """One prompt pass of ``sample`` (one row, one image) repeated to each row count a join
    runs (``join_pass_sizes``) and to a full batch, so the attention's execution plans for
    those shapes exist before the first burst (module docstring). No KV is kept."""
    tensors = {k: v for k, v in sample.items() if torch.is_tensor(v)}
    counts = sorted({*join_pass_sizes(max_batch), max_batch})
    with torch.no_grad():
        for rows in counts:
            batch = {k: v.repeat(rows, *[1] * (v.dim() - 1)) for k, v in tensors.items()}
            offsets = image_offsets(batch, generator._image_token_id, generator._tokens_per_image)
            if offsets is None:
                return  # rows the fast path cannot tell apart: it never joins them either
            generator._prefill_passes(batch, offsets, None)
