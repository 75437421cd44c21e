"""The held-answer book: replay and live follow, expiry in one sweep, and a byte cap that always holds."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from spotguard.errors import ResumeRefused
from spotguard.gate.held import ANSWER_OVERHEAD, EVENT_OVERHEAD, EndReason, HeldBook, Origin
from spotguard.metrics import Metrics

SECRET = b"my secret prompt"
ORIGIN = Origin(endpoint="/v1/chat/completions", model="m", body=b'{"messages":"' + SECRET + b'"}', stream=True)


def book(**kwargs: Any) -> HeldBook:
    settings_ = {"ttl": 600.0, "max_bytes": 1 << 20, "max_answer_bytes": 1 << 19, **kwargs}
    return HeldBook(log=structlog.get_logger("test"), **settings_)


def event(n: int, size: int = 40) -> bytes:
    return f"id: c.{n + 1}\ndata: {'x' * size}\n\n".encode()


class Follower:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: list[EndReason] = []

    def on_data(self, data: bytes) -> None:
        self.data.append(data)

    def on_end(self, reason: EndReason) -> None:
        self.ended.append(reason)


def test_replay_after_an_offset_then_live_events_then_the_end() -> None:
    held = book()
    answer = held.add("answer-0001", "f" * 32, ORIGIN, now=0.0)
    for n in range(3):
        held.append(answer, event(n))
    follower = Follower()
    held.subscribe(answer, 1, follower.on_data, follower.on_end)
    assert follower.data == [event(1) + event(2)]  # the backlog in one write
    held.append(answer, event(3))
    assert follower.data[-1] == event(3)
    held.finish(answer, now=1.0)
    assert follower.ended == ["finished"]
    assert answer.subscribers == []


def test_a_finished_answer_replays_and_ends_at_once_and_a_cancelled_follower_hears_nothing() -> None:
    held = book()
    answer = held.add("answer-0001", "f" * 32, ORIGIN, now=0.0)
    quiet = Follower()
    subscription = held.subscribe(answer, 0, quiet.on_data, quiet.on_end)
    subscription.cancel()
    held.append(answer, event(0))
    held.finish(answer, now=1.0)
    assert quiet.data == [] and quiet.ended == []
    late = Follower()
    held.subscribe(answer, 0, late.on_data, late.on_end)
    assert late.data == [event(0)] and late.ended == ["finished"]


def test_an_offset_past_the_answer_is_refused() -> None:
    held = book()
    answer = held.add("answer-0001", "f" * 32, ORIGIN, now=0.0)
    held.append(answer, event(0))
    with pytest.raises(ResumeRefused) as refused:
        held.subscribe(answer, 2, Follower().on_data, Follower().on_end)
    assert refused.value.reason == "offset"


def test_find_by_id_and_by_fingerprint_and_expiry_in_one_sweep() -> None:
    held = book(ttl=10.0)
    first = held.add("answer-0001", "a" * 32, ORIGIN, now=0.0)
    second = held.add("answer-0002", "a" * 32, ORIGIN, now=1.0)
    running = held.add("answer-0003", "b" * 32, ORIGIN, now=2.0)
    assert held.find_by_fingerprint("a" * 32, now=3.0) is second  # the newest answer to that request
    held.finish(first, now=3.0)
    held.finish(second, now=5.0)
    assert held.find("answer-0001", now=12.9) is first
    assert held.find("answer-0001", now=13.0) is None  # expired, even before a sweep
    assert held.sweep(now=13.0) == 1
    assert held.find_by_fingerprint("a" * 32, now=13.0) is second
    assert held.sweep(now=1000.0) == 1
    assert held.find_by_fingerprint("a" * 32, now=1000.0) is None
    assert held.find("answer-0003", now=1000.0) is running  # running answers do not expire
    assert len(held) == 1


def test_the_cap_evicts_finished_answers_first_with_one_log_line_each_and_no_content() -> None:
    metrics = Metrics()
    held = HeldBook(ttl=600.0, max_bytes=4000, max_answer_bytes=4000, log=structlog.get_logger("t"),
                    metrics=metrics)
    old_running = held.add("answer-run1", "a" * 32, ORIGIN, now=0.0)
    finished = held.add("answer-fin1", "b" * 32, ORIGIN, now=1.0)
    held.append(finished, event(0, 500))
    held.finish(finished, now=2.0)
    follower = Follower()
    held.subscribe(old_running, 0, follower.on_data, follower.on_end)
    newest = held.add("answer-new1", "c" * 32, ORIGIN, now=3.0)
    with capture_logs() as logs:
        for n in range(20):
            held.append(newest, event(n, 100))
    assert [entry["answer"] for entry in logs] == ["answer-fin1", "answer-run1"]  # finished first, then oldest
    assert all(entry["event"] == "resume_answer_evicted" and entry["reason"] == "evicted" for entry in logs)
    assert SECRET.decode() not in repr(logs) and "xxxx" not in repr(logs)
    assert follower.ended == ["evicted"]
    assert held.bytes <= held.max_bytes
    assert held.find("answer-new1", now=4.0) is newest
    rendered = metrics.render().decode()
    assert 'spotguard_resume_evictions_total{reason="evicted"} 2.0' in rendered
    assert f"spotguard_resume_held_bytes {float(held.bytes)}" in rendered
    assert "spotguard_resume_held_answers 1.0" in rendered


def test_an_answer_that_outgrows_its_own_cap_is_dropped_alone() -> None:
    held = book(max_bytes=100_000, max_answer_bytes=2_000)
    other = held.add("answer-0001", "a" * 32, ORIGIN, now=0.0)
    big = held.add("answer-0002", "b" * 32, ORIGIN, now=1.0)
    follower = Follower()
    held.subscribe(big, 0, follower.on_data, follower.on_end)
    for n in range(40):
        held.append(big, event(n, 100))  # appends after the drop are ignored: the client is not touched
    assert big.gone == "too_big" and follower.ended == ["too_big"]
    assert held.find("answer-0002", now=2.0) is None and held.find("answer-0001", now=2.0) is other
    assert held.bytes == other.size
    with pytest.raises(ResumeRefused):
        held.subscribe(big, 0, follower.on_data, follower.on_end)


Op = tuple[str, int, int]
ops = st.lists(st.tuples(st.sampled_from(["add", "append", "finish", "sweep", "subscribe", "remove"]),
                         st.integers(min_value=0, max_value=7), st.integers(min_value=0, max_value=3000)),
               max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=ops, max_bytes=st.integers(min_value=2_000, max_value=30_000))
def test_the_cap_is_never_exceeded_and_the_bytes_add_up(ops: list[Op], max_bytes: int) -> None:
    held = HeldBook(ttl=5.0, max_bytes=max_bytes, max_answer_bytes=max_bytes // 2, log=structlog.get_logger("t"))
    handles = {}
    now = 0.0
    for op, which, size in ops:
        now += 1.0
        answer_id = f"answer-{which:04d}"
        answer = handles.get(which)
        if op == "add" and (answer is None or answer.gone is not None):  # a gone answer's id may come back
            handles[which] = held.add(answer_id, "f" * 32, ORIGIN, now)
        elif answer is not None and op == "append" and not answer.finished:
            held.append(answer, b"d" * size)
        elif answer is not None and op == "finish":
            held.finish(answer, now)
        elif op == "sweep":
            held.sweep(now)
        elif answer is not None and op == "subscribe" and answer.gone is None:
            held.subscribe(answer, min(size, answer.delivered), Follower().on_data, Follower().on_end)
        elif answer is not None and op == "remove":
            held.remove(answer)
        present = [a for a in handles.values() if a.gone is None]
        assert held.bytes <= held.max_bytes
        assert held.bytes == sum(a.size for a in present)
        assert all(a.size == ANSWER_OVERHEAD + len(ORIGIN.body) + sum(len(e) + EVENT_OVERHEAD for e in a.events)
                   for a in present)
        assert len(held) == len(present)


@given(events=st.lists(st.binary(min_size=1, max_size=50), max_size=30), data=st.data())
def test_replay_after_offset_k_of_a_finished_answer_is_the_events_from_k(events: list[bytes], data: Any) -> None:
    held = book()
    answer = held.add("answer-0001", "f" * 32, ORIGIN, now=0.0)
    for item in events:
        held.append(answer, item)
    held.finish(answer, now=1.0)
    k = data.draw(st.integers(min_value=0, max_value=len(events)))
    follower = Follower()
    held.subscribe(answer, k, follower.on_data, follower.on_end)
    assert b"".join(follower.data) == b"".join(events[k:])
    assert follower.ended == ["finished"]
