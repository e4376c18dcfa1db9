"""Prepared pieces joining a running batch through the transformers engine
(inference/engine_joins.py, ``TransformersEngine.generate_joining``): each piece gets the
answers it gets as a batch of its own; a piece the batch cannot take stays with the feed.
The tiny demo model on the CPU with the fast decode loop attached (its eager step); the feed
is a list standing in for the worker's (tests/test_batch_pieces.py tests that one)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.settings import ModelSettings
from inference.engine import (
    GenerationRequest,
    GenerationResult,
    GenerationSettings,
    PreparedBatch,
    RowJoiningEngine,
)
from inference.fast_decode import FastGreedyGenerator
from inference.transformers_engine import TransformersEngine


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> TransformersEngine:
    engine = TransformersEngine(ModelSettings(model_path=demo_dir, device="cpu"))
    engine.attach_fast_generator(FastGreedyGenerator(engine.model, max_batch=4, max_total_len=512))
    return engine


class ListFeed:
    """Pieces offered in order; one the batch does not accept blocks those after it."""

    def __init__(self, pieces: list[PreparedBatch]) -> None:
        self.pieces = pieces
        self.offered = 0
        self.closings: list[float] = []

    def take(self, rows: int, accept: Callable[[PreparedBatch], bool]) -> PreparedBatch | None:
        self.offered += 1
        if self.pieces and len(self.pieces[0].requests) <= rows and accept(self.pieces[0]):
            return self.pieces.pop(0)
        return None

    def closing(self, seconds: float) -> None:
        self.closings.append(seconds)

    def coming(self) -> bool:
        return False  # nothing on its way: the batch never holds its first step


def request(seed: int, prompt: str, images: int = 1, new_tokens: int = 10) -> GenerationRequest:
    rng = np.random.default_rng(seed)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), mode="RGB")
        for _ in range(images)
    ]
    return GenerationRequest(pictures, prompt, GenerationSettings(max_new_tokens=new_tokens))


def answers(results: list[GenerationResult]) -> list[tuple[str, int, int]]:
    return [(r.text, r.prompt_tokens, r.new_tokens) for r in results]


LONG = "Describe this chest radiograph in detail: lungs, pleura, heart, mediastinum, bones."


def test_pieces_that_join_get_the_answers_of_their_own_batch(engine: TransformersEngine) -> None:
    assert isinstance(engine, RowJoiningEngine)
    running = [request(1, LONG)]
    pieces = [[request(2, "Findings?"), request(3, "Any fracture?")], [request(4, "Lungs?")]]
    feed = ListFeed([engine.prepare(piece) for piece in pieces])

    results = engine.generate_joining(engine.prepare(running), feed)

    alone = [engine.generate(batch) for batch in (running, *pieces)]
    assert answers(results) == answers([r for batch in alone for r in batch])
    assert feed.pieces == [] and {r.batch_size for r in results} == {4}


def test_a_piece_the_batch_cannot_take_stays_with_the_feed(engine: TransformersEngine) -> None:
    running = [request(5, LONG)]
    ct_like = engine.prepare([request(6, "Compare.", images=3)])  # another prompt group
    too_long = engine.prepare([request(7, LONG + " Then compare with the prior study, please.")])
    wants_more = engine.prepare([request(8, "Findings?", new_tokens=40)])
    for piece in (ct_like, too_long, wants_more):
        feed = ListFeed([piece])
        results = engine.generate_joining(engine.prepare(running), feed)
        assert answers(results) == answers(engine.generate(running))
        assert feed.pieces == [piece] and feed.offered > 1


def test_pieces_ready_together_join_in_one_pass(
    engine: TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Two pieces whose prompts are as long join at the same step, in one prompt pass (one
    group of rows), and each still gets the answers of its own batch."""
    running = [request(9, LONG)]
    pieces = [[request(10, "Findings?"), request(11, "Findings?")], [request(12, "Findings?")]]
    feed = ListFeed([engine.prepare(piece) for piece in pieces])
    with caplog.at_level("INFO", logger="inference.decode_joins"):
        results = engine.generate_joining(engine.prepare(running), feed)
    alone = [engine.generate(batch) for batch in (running, *pieces)]
    assert answers(results) == answers([r for batch in alone for r in batch])
    assert feed.pieces == [] and feed.offered == 2  # both taken at the first check
    assert "3 joined in 1 groups" in caplog.text
