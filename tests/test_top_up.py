"""TopUp (inference/prefetch.py): how long the batch built ahead may take studies in."""

from __future__ import annotations

import time

from inference.prefetch import TopUp


def test_without_timed_batches_it_grows_until_the_running_batch_ends() -> None:
    top_up = TopUp(interval_s=0.01)
    assert not top_up.still_running()  # nothing runs
    top_up.begin(size=1, max_batch=64)
    assert all(top_up.still_running() for _ in range(5))
    top_up.end()
    assert not top_up.still_running()


def test_a_running_batch_that_says_when_it_ends_sets_the_limit_untimed() -> None:
    top_up = TopUp(interval_s=0.01)
    top_up.begin(size=1, max_batch=64)  # nothing timed: no limit yet
    assert top_up.still_running()
    top_up.ends_in(TopUp.RENDER_MARGIN_S + 0.15)  # it took its last rows (decode_joins.py)
    assert top_up.still_running()
    top_up.ends_in(60.0)  # a later word never moves the limit back
    time.sleep(0.2)
    assert not top_up.still_running()


def test_it_stops_before_the_expected_end_less_the_time_to_prepare() -> None:
    top_up = TopUp(interval_s=0.01)
    top_up.record_generate(64, TopUp.RENDER_MARGIN_S + 0.15)
    top_up.record_tail(32, 0.0)
    top_up.begin(size=64, max_batch=64)
    assert top_up.still_running()  # 0.15 s to go
    time.sleep(0.2)
    assert not top_up.still_running()  # the running batch has not ended, yet no more


def test_the_time_to_prepare_a_full_batch_comes_off_the_expected_end() -> None:
    top_up = TopUp(interval_s=0.01)
    top_up.record_generate(64, 3.0)
    top_up.record_tail(10, 1.0)  # 0.1 s a study: 6.4 s for 64, more than the batch runs
    top_up.begin(size=64, max_batch=64)
    assert not top_up.still_running()
    top_up.begin(size=64, max_batch=8)  # 0.8 s + margin: there is time
    assert top_up.still_running()


def test_only_batches_no_larger_than_the_running_one_give_its_expected_time() -> None:
    top_up = TopUp(interval_s=0.01)
    top_up.record_generate(64, 0.0)  # a larger batch says nothing of a smaller one's end
    top_up.begin(size=8, max_batch=64)
    assert top_up.still_running()
    top_up.record_generate(4, 0.0)
    top_up.begin(size=8, max_batch=64)
    assert not top_up.still_running()


def test_a_batch_built_in_pieces_leaves_one_piece_at_most_after_its_last_render() -> None:
    top_up = TopUp(interval_s=0.01)
    top_up.record_generate(64, 3.0)
    top_up.record_tail(2, 0.2, piece=8)  # 0.1 s a study; one piece of 8 left: 0.8 s
    top_up.begin(size=64, max_batch=64)
    assert top_up.still_running()  # 3.0 - 0.8 - margin: about 2 s to go
    top_up.record_tail(2, 0.2)  # prepared whole after the last render: 6.4 s for 64
    top_up.begin(size=64, max_batch=64)
    assert not top_up.still_running()
    top_up.record_tail(1, 0.5, piece=8)  # a piece of 8 at 0.5 s a study: 4 s, over 3 s
    top_up.begin(size=64, max_batch=64)
    assert not top_up.still_running()
