"""Rows that join a running batch (inference/decode_joins.py) get exactly the tokens
``model.generate`` gives them as a batch of their own, whenever they join: the tiny demo model
in float32 on the CPU, the eager step on the same static buffers the CUDA graphs replay.
The source of rows is a scripted double of the engine's (which tests/test_engine_joins.py
runs for real)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from inference import decode_joins
from inference.fast_buffers import pass_bounds
from inference.fast_decode import FastGreedyGenerator
from tests.test_fast_decode import plain, study_inputs

LONGEST = "List the findings, then an impression, in two short paragraphs please."


def assert_rows(got: torch.Tensor, expected: torch.Tensor, pad: int = 0) -> None:
    """``got`` starts with ``expected`` (generate's own tokens) and is pad after it."""
    width = expected.shape[1]
    assert torch.equal(got[:, :width], expected)
    assert (got[:, width:] == pad).all()


class Scripted:
    """Hands out ``offers[i]`` at its i-th call (None: nothing then); records each call's
    (free rows, longest prompt)."""

    def __init__(self, offers: list[dict[str, torch.Tensor] | None]) -> None:
        self.offers = offers
        self.calls: list[tuple[int, int]] = []
        self.closings: list[float] = []  # the batch's end, as it said it

    def take(self, rows: int, prompt_len: int) -> Mapping[str, torch.Tensor] | None:
        self.calls.append((rows, prompt_len))
        offer = self.offers[len(self.calls) - 1] if len(self.calls) <= len(self.offers) else None
        if offer is not None:
            assert offer["input_ids"].shape[0] <= rows
            assert offer["input_ids"].shape[1] <= prompt_len
        return offer

    def closing(self, seconds: float) -> None:
        self.closings.append(seconds)

    def coming(self) -> bool:
        return False  # nothing on its way: the batch never holds its first step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs and Triton need a GPU"))])  # fmt: skip
def test_rows_joining_at_two_steps_get_their_own_batch_tokens(
    model: Any, processor: Any, device: str
) -> None:
    """On CUDA: the captured graphs (and Triton's step, where installed), float32."""
    model = copy.deepcopy(model).to(device) if device != "cpu" else model
    first, pair, late = (
        {k: v.to(device) for k, v in study_inputs(processor, questions).items()}
        for questions in ([LONGEST], ["Any fracture?", "Describe the chest X-ray."], ["Heart?"])
    )
    source = Scripted([None, pair, None, late])
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256, check_every=1)

    out = gen.generate(first, max_new_tokens=12, joins=source)

    assert out.shape[0] == 4  # the batch's row, then the joined rows in joining order
    assert_rows(out[:1], plain(model, first, 12))
    assert_rows(out[1:3], plain(model, pair, 12))
    assert_rows(out[3:], plain(model, late, 12))
    # Offered before every step (on the CPU: on CUDA every check_every steps) while the first
    # row runs, with the rows left free and the column the batch has reached; none once full.
    length = first["input_ids"].shape[1]
    assert source.calls == [(3, length), (3, length + 1), (1, length + 2), (1, length + 3)]
    # Full after the fourth: it said once when it would end (11 steps on, timed meanwhile).
    assert len(source.closings) == 1 and source.closings[0] > 0
    assert (4, 256) in gen._states  # it moved to the bucket of four


class Arriving(Scripted):
    """``Scripted``, with rows on their way for its first ``coming_for`` answers to coming()."""

    def __init__(self, offers: list[dict[str, torch.Tensor] | None], coming_for: int) -> None:
        super().__init__(offers)
        self.coming_for = coming_for
        self.asked_coming = 0

    def coming(self) -> bool:
        self.asked_coming += 1
        return self.asked_coming <= self.coming_for


def test_a_batch_holds_its_first_step_for_rows_on_their_way(
    model: Any, processor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    first, pair, late = (
        study_inputs(processor, questions)
        for questions in ([LONGEST], ["Any fracture?", "Describe the chest X-ray."], ["Heart?"])
    )
    source = Arriving([None, pair, None, late], coming_for=10)
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256, check_every=1)

    with caplog.at_level(logging.INFO, logger="inference.decode_joins"):
        out = gen.generate(first, max_new_tokens=12, joins=source)

    assert_rows(out[:1], plain(model, first, 12))
    assert_rows(out[1:3], plain(model, pair, 12))
    assert_rows(out[3:], plain(model, late, 12))
    # Every row taken at the prompt's column, before any decode step; full, never asked again.
    length = first["input_ids"].shape[1]
    assert source.calls == [(3, length), (3, length), (1, length), (1, length)]
    assert "2 groups, the last at step 0; 12 steps" in caplog.text  # no step past the first rows'
    assert "batch held" in caplog.text and "2 takes of rows" in caplog.text
    assert "rows each took: 2/1" in caplog.text  # on the CPU: no GPU time to add


def test_a_hold_ends_when_the_rows_on_their_way_do_not_come(
    model: Any, processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode_joins, "HOLD_GAP_S", 0.05)
    first, late = study_inputs(processor, [LONGEST]), study_inputs(processor, ["Heart?"])
    offers: list[dict[str, torch.Tensor] | None] = [None] * 200
    source = Arriving([*offers, late], coming_for=10**6)  # always says more is coming
    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=256, check_every=1)

    out = gen.generate(first, max_new_tokens=8, joins=source)

    assert_rows(out[:1], plain(model, first, 8))
    length = first["input_ids"].shape[1]
    held = [call for call in source.calls if call == (1, length)]
    # Asked again and again at the prompt's column (the hold; without it: twice), then decoded.
    assert 2 < len(held) < 200 and source.calls[-1] == (1, length + 6)
    assert out.shape[0] == 1


def test_joined_rows_stop_at_their_own_end(model: Any, processor: Any) -> None:
    first = study_inputs(processor, [LONGEST])
    joined = study_inputs(processor, ["Any fracture?"])
    free = plain(model, joined, 16)[0].tolist()
    # A token the joining row makes early (for the first time at ``at``): its end of sequence.
    at = next(i for i in range(2, 16) if free[i] not in free[:i])
    stop = free[at]
    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=256)

    out = gen.generate(
        first, max_new_tokens=16, eos_token_ids=[stop], pad_token_id=0,
        joins=Scripted([None, None, None, joined]),
    )  # fmt: skip

    assert_rows(out[:1], plain(model, first, 16, eos_token_id=[stop], pad_token_id=0))
    expected = plain(model, joined, 16, eos_token_id=[stop], pad_token_id=0)
    assert_rows(out[1:], expected)
    assert expected.shape[1] == at + 1 and int(expected[0, at]) == stop


def test_rows_are_asked_for_while_the_first_rows_run_and_by_fuller_batches_only_at_first(
    model: Any, processor: Any
) -> None:
    first = study_inputs(processor, [LONGEST])
    free = plain(model, first, 10)
    never = next(t for t in range(1, 1000) if t not in free[0].tolist())  # no early end
    source = Scripted([])
    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=256)

    out = gen.generate(first, max_new_tokens=10, eos_token_ids=[never], joins=source)

    assert torch.equal(out, free)
    length = first["input_ids"].shape[1]
    # One row of two: asked before each of the 9 steps after its first token, never after.
    assert source.calls == [(1, length + step) for step in range(9)]
    # Three rows of four (more than half full): asked once, before the first step, and never
    # during the steps (decode_joins.py says why); four of four: never asked.
    wide = FastGreedyGenerator(model, max_batch=4, max_total_len=256)
    three = study_inputs(processor, [LONGEST, "Any fracture?", "Heart?"])
    once = Scripted([])
    assert torch.equal(wide.generate(three, max_new_tokens=6, joins=once), plain(model, three, 6))
    assert once.calls == [(1, three["input_ids"].shape[1])]
    four = study_inputs(processor, [LONGEST, "Any fracture?", "Heart?", "Lungs?"])
    unasked = Scripted([])
    assert torch.equal(wide.generate(four, max_new_tokens=6, joins=unasked), plain(model, four, 6))
    assert unasked.calls == []


def test_a_fuller_batch_holds_for_rows_on_their_way_and_takes_none_once_it_decodes(
    model: Any, processor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Three rows of four: the late study joins before the first step (a batch of its own
    after this one otherwise); offered again during the steps, nothing is asked for."""
    three = study_inputs(processor, [LONGEST, "Any fracture?", "Heart?"])
    late = study_inputs(processor, ["Describe the chest X-ray."])
    later = study_inputs(processor, ["Lungs?"])
    source = Arriving([None, None, late, *[later] * 20], coming_for=3)
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256, check_every=1)

    with caplog.at_level(logging.INFO, logger="inference.decode_joins"):
        out = gen.generate(three, max_new_tokens=10, joins=source)

    assert_rows(out[:3], plain(model, three, 10))
    assert_rows(out[3:], plain(model, late, 10))
    length = three["input_ids"].shape[1]
    assert source.calls == [(1, length)] * 3  # held until the third ask, then full
    assert "1 groups, the last at step 0; 10 steps" in caplog.text
    assert "batch held" in caplog.text and "rows each took: 1" in caplog.text
    # Nothing ready: the same batch asks at its first step and decodes alone, never asking
    # again however long it runs.
    idle = Arriving([], coming_for=0)
    assert torch.equal(gen.generate(three, max_new_tokens=10, joins=idle), plain(model, three, 10))
    assert idle.calls == [(1, length)]


@pytest.mark.parametrize("bad", ["longer", "more rows"])
def test_a_source_that_breaks_its_word_ends_the_batch_with_an_error(
    model: Any, processor: Any, bad: str
) -> None:
    first = study_inputs(processor, ["Any fracture?"])
    if bad == "longer":
        offer = study_inputs(processor, [LONGEST + " And more words, many more words."])
    else:
        offer = study_inputs(processor, ["Any fracture?"] * 3)

    class Careless(Scripted):
        def take(self, rows: int, prompt_len: int) -> Mapping[str, torch.Tensor] | None:
            self.calls.append((rows, prompt_len))
            return offer

    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=256)
    with pytest.raises(ValueError, match="cannot join"):
        gen.generate(first, max_new_tokens=8, joins=Careless([]))


def test_rows_the_buffers_cannot_take_are_decoded_apart(model: Any, processor: Any) -> None:
    first = study_inputs(processor, [LONGEST])
    # Padded on the right (no processor of ours pads so): the static buffers cannot take it.
    right = study_inputs(processor, ["Any fracture?", "Heart?"])
    for row, mask in enumerate(right["attention_mask"].clone()):
        for key in ("input_ids", "attention_mask"):
            right[key][row] = torch.cat([right[key][row][mask == 1], right[key][row][mask == 0]])
    assert not bool(right["attention_mask"][:, -1].all())
    source = Scripted([None, right])
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256)

    out = gen.generate(first, max_new_tokens=8, joins=source)

    assert out.shape[0] == 3  # taken, and answered: never lost
    assert_rows(out[:1], plain(model, first, 8))
    assert_rows(out[1:], plain(model, right, 8))


def rows_of_each_pass(gen: FastGreedyGenerator, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every prompt pass ``gen`` runs from now on (it runs them all the same)."""
    passes: list[int] = []
    prefill = gen._prefill

    def counted(batch: dict[str, torch.Tensor], prefix: Any = None) -> Any:
        passes.append(int(batch["input_ids"].shape[0]))
        return prefill(batch, prefix)

    monkeypatch.setattr(gen, "_prefill", counted)
    return passes


def test_a_join_of_more_rows_than_a_pass_takes_runs_in_several_passes(
    model: Any, processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three rows offered at once join in passes of JOIN_PASS_ROWS (here 2): the row counts
    warmed at load (warm_pass_shapes), each row with the tokens of its own batch."""
    monkeypatch.setattr(decode_joins, "JOIN_PASS_ROWS", 2)
    first = study_inputs(processor, [LONGEST])
    three = study_inputs(processor, ["Any fracture?", "Describe the chest X-ray.", "Heart?"])
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256, check_every=1)
    passes = rows_of_each_pass(gen, monkeypatch)

    out = gen.generate(first, max_new_tokens=10, joins=Arriving([three], coming_for=1))

    assert passes == [1, 2, 1]  # the batch's own row, then the three joining as 2 + 1
    assert_rows(out[:1], plain(model, first, 10))
    assert_rows(out[1:], plain(model, three, 10))


def test_a_large_take_runs_in_the_larger_warmed_passes(
    model: Any, processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven rows offered at once, passes of 1-2 rows and the larger 4: they join as 4 + 2 + 1
    (each a count warmed at load), token-identical to their own batch."""
    monkeypatch.setattr(decode_joins, "JOIN_PASS_ROWS", 2)
    monkeypatch.setattr(decode_joins, "LARGER_JOIN_PASSES", (4, 16))
    first = study_inputs(processor, [LONGEST])
    questions = ["Any fracture?", "Describe the chest X-ray.", "Heart?", "Lungs?", "Ribs?"]
    seven = study_inputs(processor, [*questions, "Effusion?", "Any nodule?"])
    gen = FastGreedyGenerator(model, max_batch=8, max_total_len=256, check_every=1)
    passes = rows_of_each_pass(gen, monkeypatch)

    out = gen.generate(first, max_new_tokens=10, joins=Arriving([seven], coming_for=1))

    assert passes == [1, 4, 2, 1]
    assert_rows(out[:1], plain(model, first, 10))
    assert_rows(out[1:], plain(model, seven, 10))


def test_join_passes_split_a_take_into_the_warmed_row_counts() -> None:
    sizes = decode_joins.join_pass_sizes(256)
    assert sizes == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]
    assert decode_joins.join_pass_sizes(4) == [1, 2, 3, 4]
    assert decode_joins.join_pass_sizes(16) == [*range(1, 9), 16]
    assert decode_joins.join_passes(96, sizes) == [64, 32]
    assert decode_joins.join_passes(63, sizes) == [32, 16, 8, 7]
    assert decode_joins.join_passes(5, sizes) == [5]
    assert decode_joins.join_passes(200, sizes) == [64, 64, 64, 8]
    assert decode_joins.join_passes(0, sizes) == []


def test_pass_bounds_keep_each_pass_within_the_token_budget() -> None:
    assert pass_bounds(96, [64, 32], most_rows=96) == [(0, 64), (64, 96)]
    assert pass_bounds(71, [64, 7], most_rows=40) == [(0, 40), (40, 64), (64, 71)]
    assert pass_bounds(10, None, most_rows=4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="do not make"):
        pass_bounds(10, [4, 4], most_rows=96)


def test_warm_pass_shapes_runs_each_row_count_a_join_runs_and_a_full_batch(
    model: Any, processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode_joins, "JOIN_PASS_ROWS", 2)
    sample = study_inputs(processor, [LONGEST])
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256, check_every=1)
    passes = rows_of_each_pass(gen, monkeypatch)

    decode_joins.warm_pass_shapes(gen, sample, max_batch=4)

    assert passes == [1, 2, 4]
    assert not gen._states  # no decode state made, no KV kept
