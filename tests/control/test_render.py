"""``spotguard status`` text from a status document shaped like the daemon's."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from spotguard.control.render import format_status
from spotguard.drain.timeline import StepRecord
from spotguard.notice import Notice, parse_rfc3339

NOW = parse_rfc3339("2026-11-23T06:00:30Z")


def _at(text: str) -> datetime:
    return parse_rfc3339(text)


def doc() -> dict[str, Any]:
    """What /status answers during a drain, built with the daemon's own serializers (Notice.to_json
    less its payload, StepRecord.to_json), with every top-level key the runner's status() emits."""
    notice = Notice(source="aws", kind="spot-interruption", event_id="i-0abc", deadline=_at("2026-11-23T06:02:00Z"),
                    detected_at=_at("2026-11-23T06:00:00.120Z"), payload='{"action": "terminate"}')
    public = notice.to_json()
    public.pop("payload")
    steps = [
        StepRecord(name="readiness", state="done", outcome="ok", started_at=_at("2026-11-23T06:00:00.200Z"),
                   finished_at=_at("2026-11-23T06:00:00.201Z"), detail="marked not ready", duration=0.001,
                   attempts=1),
        StepRecord(name="deregister", state="done", outcome="timed_out", started_at=_at("2026-11-23T06:00:00.200Z"),
                   finished_at=_at("2026-11-23T06:00:15.200Z"), detail="hung-lb: no answer within 15.00s " + "x" * 100,
                   duration=15.0, attempts=1),
        StepRecord(name="wait_inflight", after=("stop_accepting",), state="running",
                   started_at=_at("2026-11-23T06:00:10.000Z"), attempts=1),
        StepRecord(name="snapshot", after=("wait_inflight",)),
    ]
    return {"state": "draining", "cloud": "aws", "notice": public, "seconds_left": 90.0,
            "steps": [step.to_json() for step in steps], "live_notices": [public], "observed": [],
            "sources": {"aws-spot": {"polls": 12, "errors": 0, "last_error": None}}, "dry_run": False,
            "started_at": "2026-11-23T05:00:00.000Z"}


def test_a_drain_in_progress_reads_as_a_timeline() -> None:
    text = format_status(doc(), now=NOW)
    lines = text.splitlines()
    assert lines[0] == "state:    draining"
    assert lines[1] == "cloud:    aws"
    assert lines[2] == "notice:   aws spot-interruption (event i-0abc)"
    assert lines[3] == "deadline: 2026-11-23T06:02:00Z (in 1m30s)"
    header = next(line for line in lines if line.startswith("STEP"))
    assert header.split() == ["STEP", "STATE", "OUTCOME", "STARTED", "DURATION", "LEFT", "DETAIL"]
    # LEFT counts to the notice's deadline (06:02:00), the one /status carries.
    readiness = next(line for line in lines if line.startswith("readiness"))
    assert readiness.split()[:6] == ["readiness", "done", "ok", "06:00:00.200Z", "0.0s", "2m00s"]
    dereg = next(line for line in lines if line.startswith("deregister"))
    assert "timed_out" in dereg and "15.0s" in dereg and "1m45s" in dereg and dereg.endswith("…")
    running = next(line for line in lines if line.startswith("wait_inflight"))
    assert running.split()[:6] == ["wait_inflight", "running", "-", "06:00:10.000Z", "20.0s…", "1m30s"]
    assert next(line for line in lines if line.startswith("snapshot")).split() == \
        ["snapshot", "pending", "-", "-", "-", "-"]
    assert lines[-1] == "2 of 4 steps done"


def test_serving_without_a_notice_and_a_passed_deadline() -> None:
    assert format_status({"state": "serving", "cloud": None, "notice": None, "steps": []}, now=NOW) == (
        "state:    serving\ncloud:    none\nnotice:   none\ndrain:    no drain has run\n")
    late = format_status(doc(), now=NOW + timedelta(minutes=3))
    assert "(passed 1m30s ago)" in late


def test_a_malformed_document_still_renders() -> None:
    text = format_status({"state": "drained", "notice": {"deadline": "garbage"}, "steps": [{"name": "x"}, 5]},
                         now=NOW)
    assert "notice:   ? ? (event ?)" in text and "x     pending" in text


def test_a_drain_that_has_not_recorded_a_step_is_not_reported_as_none() -> None:
    started = {"state": "draining", "cloud": "none", "notice": doc()["notice"], "steps": []}
    assert "drain:    running; no step has reported yet" in format_status(started, now=NOW)
    assert "no drain has run" not in format_status(started, now=NOW)


def test_a_deadline_brought_forward_and_a_drain_that_handed_requests_to_peers() -> None:
    drained = {**doc(), "state": "drained",
               "deadline": {"vm": "2026-11-23T06:00:40Z", "drain": "2026-11-23T06:00:35Z", "source": "manual",
                            "kind": "manual"},
               "drain_deadline": "2026-11-23T06:00:35Z", "drain_result": "ok, with 1 request handed to peers",
               "steps": [StepRecord(name="wait_inflight", state="done", outcome="handed_over", attempts=1,
                                    started_at=_at("2026-11-23T06:00:01Z"), finished_at=_at("2026-11-23T06:00:05Z"),
                                    duration=4.0, detail="1 requests still in flight after 4.00s").to_json()]}
    lines = format_status(drained, now=NOW).splitlines()
    # The VM goes at the node's deadline (an operator's earlier one), not at the notice's own.
    assert lines[3] == "deadline: 2026-11-23T06:00:40Z (in 10.0s; brought forward by a manual manual notice)"
    wait = next(line for line in lines if line.startswith("wait_inflight"))
    assert wait.split()[:6] == ["wait_inflight", "done", "handed_over", "06:00:01.000Z", "4.0s", "30.0s"]
    assert "result:   ok, with 1 request handed to peers" in lines
