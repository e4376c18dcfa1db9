"""PiecewiseBuild (inference/batch_pieces.py): renders questioned and prepared in pieces as
they finish, joined at the end; every way it can fail leaves the batch to be prepared whole,
with no study lost. Real renders (render_timed on RG1_UNCI, in this process); the engine is a
recording double."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from inference import batch_pieces
from inference.batch_pieces import PieceFeed, PiecewiseBuild, Render, Rendered, piece_size
from inference.engine import GenerationRequest, JoinError, PreparedBatch
from inference.render_pool import RenderedStudy, render_timed
from inference.worker_jobs import JobSource, PreparedJob


@dataclass
class Joiner:
    """Records each piece it prepares; fails the prepare numbered ``fail_prepare`` or the
    join when told to."""

    fail_prepare: int | None = None
    fail_join: bool = False
    pieces: list[int] = field(default_factory=list)
    joins: list[list[int]] = field(default_factory=list)

    def prepare(self, requests: list[GenerationRequest]) -> PreparedBatch:
        if len(self.pieces) == self.fail_prepare:
            raise MemoryError("no room for this piece")
        self.pieces.append(len(requests))
        return PreparedBatch(list(requests), inputs=[r.prompt for r in requests])

    def join(self, pieces: list[PreparedBatch]) -> PreparedBatch:
        if self.fail_join:
            raise JoinError("cannot join")
        self.joins.append([len(p.requests) for p in pieces])
        return PreparedBatch([r for p in pieces for r in p.requests], inputs="joined")


@pytest.fixture
def rendered(rg1_unci: Path) -> Iterator[RenderedStudy]:
    study = render_timed([rg1_unci])
    yield study
    for image in study.images:  # renders() hands out copies of these
        image.path.unlink()


def renders(rendered: RenderedStudy, count: int, first: int = 1) -> list[Render]:
    """``count`` finished renders of one study (jobs ``first`` on); each takes its own copy
    of the shared files."""
    out: list[Render] = []
    for job_id in range(first, first + count):
        future: Future[RenderedStudy] = Future()
        copies = []
        for image in rendered.images:
            target = image.path.with_name(f"{image.path.name}-{job_id}")
            target.write_bytes(image.path.read_bytes())
            copies.append(type(image)(target, image.shape, image.mode))
        future.set_result(RenderedStudy(rendered.prepared, copies, rendered.seconds))
        source = JobSource(job_id, job_id, job_id, f"1.2.{job_id}", "MODALITY", [])
        out.append((source, future))
    return out


def ask(items: list[Rendered]) -> list[PreparedJob]:
    return [
        PreparedJob(s.job_id, s.study_id, s.study_version_id, s.study_uid, p, f"q{s.job_id}", "en")
        for s, p, _ in items
    ]


def request(job: PreparedJob) -> GenerationRequest:
    return GenerationRequest(images=job.prepared.images, prompt=job.question)


def build(engine: Joiner | None, piece: int) -> tuple[PiecewiseBuild, list[int]]:
    failed: list[int] = []
    return PiecewiseBuild(engine, ask, request, lambda j, _e: failed.append(j), piece), failed


def test_pieces_are_prepared_as_renders_finish_and_joined_in_job_order(
    rendered: RenderedStudy,
) -> None:
    engine = Joiner()
    pieces, failed = build(engine, piece=2)
    pieces.add(renders(rendered, 3))
    pieces.harvest()  # three rendered: one piece of two, one study waits
    assert engine.pieces == [2]
    pieces.add(renders(rendered, 2))
    stamps: dict[str, float] = {}
    joined = pieces.finish(stamps)
    assert engine.pieces == [2, 2, 1] and engine.joins == [[2, 2, 1]]
    assert joined is not None
    assert [r.prompt for r in joined.requests] == [j.question for j in pieces.jobs]
    assert [j.question for j in pieces.jobs] == ["q1", "q2", "q3", "q1", "q2"]
    assert all(j.prepared.images for j in pieces.jobs)
    assert set(stamps) == {"rendered", "asked", "built"} and not failed
    for job in pieces.jobs:  # each study's own way, for the benchmark's profile
        way = [job.stamps[stage] for stage in ("submitted", "rendered", "asked", "ready")]
        assert way == sorted(way) and "joined" not in job.stamps


@pytest.mark.parametrize("engine", [None, Joiner(fail_prepare=1), Joiner(fail_join=True)])
def test_whatever_fails_leaves_every_study_to_be_prepared_whole(
    rendered: RenderedStudy, engine: Joiner | None
) -> None:
    pieces, failed = build(engine, piece=2)
    pieces.add(renders(rendered, 5))
    assert pieces.finish({}) is None
    assert [j.job_id for j in pieces.jobs] == [1, 2, 3, 4, 5] and not failed


def test_a_render_that_failed_fails_its_job_only(rendered: RenderedStudy) -> None:
    engine = Joiner()
    pieces, failed = build(engine, piece=8)
    broken: Future[RenderedStudy] = Future()
    broken.set_exception(RuntimeError("the render process died"))
    source = JobSource(9, 9, 9, "1.2.9", "MODALITY", [])
    pieces.add([*renders(rendered, 2), (source, broken)])
    joined = pieces.finish({})
    assert failed == [9] and engine.joins == [[2]]
    assert joined is not None and len(joined.requests) == 2


def test_a_piece_is_a_quarter_of_the_batch_from_one_to_eight() -> None:
    assert [piece_size(b) for b in (1, 4, 16, 32, 64, 256)] == [1, 1, 4, 8, 8, 8]


def test_the_running_batch_takes_whole_prepared_pieces_until_the_batch_is_complete(
    rendered: RenderedStudy,
) -> None:
    engine = Joiner()
    claimed = [1, 2, 3, 4, 5]
    pieces = PiecewiseBuild(engine, ask, request, lambda j, _e: None, 2, claimed)
    closings: list[float] = []
    feed = PieceFeed(closings.append)
    feed.closing(1.5)  # the running batch's end goes where the worker said
    assert closings == [1.5]
    with feed.offering(pieces):
        taken = take_two_pieces(feed, pieces, rendered, claimed)
    assert feed.take(4, lambda _piece: True) is None  # no batch being built now
    ended = feed.end()
    assert [j.job_id for j in ended] == [1, 2] and feed.end() == []
    assert all(j.stamps["joined"] >= j.stamps["ready"] for j in ended)
    assert taken == ["q1", "q2"]


def take_two_pieces(
    feed: PieceFeed, pieces: PiecewiseBuild, rendered: RenderedStudy, claimed: list[int]
) -> list[str]:
    pieces.add(renders(rendered, 5))
    pieces.harvest()  # two pieces of two, one study waiting
    assert feed.take(1, lambda _piece: True) is None  # a piece is never split
    assert feed.take(4, lambda _piece: False) is None  # the running batch cannot take it
    taken = feed.take(4, lambda _piece: True)
    assert taken is not None
    assert [j.job_id for j in pieces.jobs] == [3, 4, 5] and claimed == [3, 4, 5]
    joined = pieces.finish({})
    assert feed.take(4, lambda _piece: True) is None  # complete: nothing leaves any more
    assert joined is not None and [r.prompt for r in joined.requests] == ["q3", "q4", "q5"]
    return [r.prompt for r in taken.requests]


def test_a_running_batch_with_fewer_free_rows_than_a_piece_gets_a_piece_its_size(
    rendered: RenderedStudy,
) -> None:
    engine = Joiner()
    claimed = list(range(1, 8))
    pieces = PiecewiseBuild(engine, ask, request, lambda j, _e: None, 4, claimed)
    feed = PieceFeed()
    with feed.offering(pieces):
        pieces.add(renders(rendered, 4))
        pieces.harvest()
        assert feed.take(3, lambda _piece: True) is None  # one piece of 4: too large
        pieces.add(renders(rendered, 3, first=5))
        pieces.harvest()  # the next piece is of the 3 rows the running batch has
        assert engine.pieces == [4, 3]
        taken = feed.take(3, lambda _piece: True)
    assert taken is not None and [j.job_id for j in feed.end()] == [5, 6, 7]
    assert [j.job_id for j in pieces.jobs] == [1, 2, 3, 4] and claimed == [1, 2, 3, 4]
    joined = pieces.finish({})
    assert joined is not None and [r.prompt for r in joined.requests] == ["q1", "q2", "q3", "q4"]


def test_a_complete_batch_remakes_its_last_piece_at_the_size_a_running_batch_wants(
    rendered: RenderedStudy,
) -> None:
    engine = Joiner()
    pieces = PiecewiseBuild(engine, ask, request, lambda j, _e: None, 4, [1, 2, 3, 4, 5])
    feed = PieceFeed()
    with feed.offering(pieces):
        pieces.add(renders(rendered, 5))
        pieces.harvest()  # a piece of 4, one study waiting, nothing more on its way
        assert feed.take(3, lambda _piece: True) is None and feed.taking
        pieces.harvest()
        assert engine.pieces == [4, 3]
        taken = feed.take(3, lambda _piece: True)
        feed.closing(0.5)
        assert not feed.taking
    assert taken is not None and [j.job_id for j in feed.end()] == [1, 2, 3]
    joined = pieces.finish({})
    assert engine.pieces == [4, 3, 2]
    assert joined is not None and [r.prompt for r in joined.requests] == ["q4", "q5"]


def test_a_held_batch_is_told_what_is_coming_and_gets_the_studies_left_as_a_piece(
    rendered: RenderedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_pieces, "HELD_S", 60.0)  # the harvests below count as held
    monkeypatch.setattr(batch_pieces, "CLAIMED_RECENTLY_S", 0.0)  # the next test's subject
    engine = Joiner()
    pieces = PiecewiseBuild(engine, ask, request, lambda j, _e: None, 4, list(range(1, 7)))
    feed = PieceFeed()
    assert not feed.coming()  # no batch being built
    last: Future[RenderedStudy] = Future()
    source = JobSource(6, 6, 6, "1.2.6", "MODALITY", [])
    with feed.offering(pieces):
        assert not feed.coming()  # nothing claimed yet
        pieces.add([*renders(rendered, 5), (source, last)])
        assert feed.coming()  # rendering
        pieces.harvest()  # a piece of 4; study 5 waits; study 6 still renders
        assert engine.pieces == [4]
        first = feed.take(8, lambda _piece: True)
        assert first is not None and feed.coming()
        pieces.harvest()
        assert engine.pieces == [4]  # one waits while another renders: no piece of one
        last.set_result(renders(rendered, 1, first=6)[0][1].result())
        assert feed.coming()
        pieces.harvest()  # nothing renders and the batch holds: the two left make a piece
        assert engine.pieces == [4, 2]
        second = feed.take(8, lambda _piece: True)
        assert second is not None and not feed.coming()  # nothing left on its way
    assert [j.job_id for j in feed.end()] == [1, 2, 3, 4, 5, 6]
    assert pieces.finish({}) is None and pieces.claimed == []


def test_studies_claimed_a_moment_ago_count_as_coming_with_none_in_flight(
    rendered: RenderedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build taking in a burst claims every few tens of milliseconds: between two claims,
    with its last piece taken, the running batch is still told more is coming, until
    CLAIMED_RECENTLY_S has passed since the last claim."""
    clock = [100.0]
    monkeypatch.setattr(batch_pieces.time, "monotonic", lambda: clock[0])
    pieces = PiecewiseBuild(Joiner(), ask, request, lambda j, _e: None, 2, [1, 2])
    feed = PieceFeed()
    with feed.offering(pieces):
        pieces.add([])  # a top-up round that claimed nothing is no claim
        assert not feed.coming()
        pieces.add(renders(rendered, 2))
        pieces.harvest()
        assert feed.take(2, lambda _piece: True) is not None  # nothing left in flight
        clock[0] += batch_pieces.CLAIMED_RECENTLY_S / 2
        assert feed.coming()
        clock[0] += batch_pieces.CLAIMED_RECENTLY_S / 2
        assert not feed.coming()
    assert [j.job_id for j in feed.end()] == [1, 2]


def test_a_build_started_counts_as_coming_until_it_is_offered_or_ends() -> None:
    """The running batch may ask before the build started for it has claimed anything: the
    feed says studies are coming until that build offers its pieces (then the build says) or
    ends without offering them."""
    feed = PieceFeed()
    said: list[bool] = []

    def build_offering() -> str:
        said.append(feed.coming())  # started, still claiming
        with feed.offering(PiecewiseBuild(Joiner(), ask, request, lambda j, _e: None, 4, [])):
            said.append(feed.coming())  # offered, nothing claimed
        return "built"

    build = feed.starting(build_offering)
    assert feed.coming()  # started in another thread, not yet running
    assert build() == "built" and said == [True, False]
    assert not feed.coming()

    def never_offered() -> None:
        raise RuntimeError("the claim failed")

    failing = feed.starting(never_offered)
    assert feed.coming()
    with pytest.raises(RuntimeError):
        failing()
    assert not feed.coming()
