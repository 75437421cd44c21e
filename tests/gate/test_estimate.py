"""Will an answer finish here before the drain deadline: the gate's estimate from its own pace."""

from __future__ import annotations

from spotguard.gate.estimate import HEADROOM, finishes_within, pace, token_limit


def test_the_token_limit_is_the_smallest_one_the_request_sets() -> None:
    assert token_limit({"max_tokens": 50, "max_completion_tokens": 40}) == 40
    assert token_limit({"n_predict": 7}) == 7
    assert token_limit({"max_tokens": 2.0}) is None and token_limit({"max_tokens": True}) is None
    assert token_limit({}) is None


def test_the_pace_is_the_slower_of_overall_and_recent() -> None:
    assert pace(delivered=3, elapsed=1.0) is None  # too few tokens to judge
    assert pace(delivered=100, elapsed=0.0) is None
    assert pace(delivered=100, elapsed=1.0) == 100.0
    assert pace(delivered=100, elapsed=1.0, recent=(10, 0.5)) == 20.0  # slowing down: the recent pace counts
    assert pace(delivered=100, elapsed=1.0, recent=(500, 1.0)) == 100.0  # speeding up: the overall one


def test_what_cannot_be_told_does_not_finish() -> None:
    assert not finishes_within(limit=None, delivered=10, rate=100.0, seconds=60)  # no limit
    assert not finishes_within(limit=100, delivered=10, rate=None, seconds=60)  # no pace yet
    assert finishes_within(limit=100, delivered=100, rate=None, seconds=0)  # nothing left to generate
    # 90 tokens at 10/s take 9 s: kept within 9 / HEADROOM seconds, handed over below that
    assert finishes_within(limit=100, delivered=10, rate=10.0, seconds=9 / HEADROOM)
    assert not finishes_within(limit=100, delivered=10, rate=10.0, seconds=9 / HEADROOM - 0.1)
