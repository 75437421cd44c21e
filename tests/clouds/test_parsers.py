"""The three clouds' parsers on arbitrary input (only MalformedMetadata, never a fake notice) and on
valid documents (every field comes back)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard.clouds import aws, azure, gcp
from spotguard.clouds._parse import FirstSeen
from spotguard.errors import MalformedMetadata
from spotguard.notice import Notice

NOW = datetime(2026, 11, 23, 6, 0, 0, tzinfo=UTC)


def seen(_: str) -> datetime:
    return NOW


def _aws_instance_action(text: str) -> list[Notice]:
    return aws.parse_instance_action(text, seen)


def _aws_rebalance(text: str) -> list[Notice]:
    return aws.parse_rebalance(text, seen)


def _aws_scheduled(text: str) -> list[Notice]:
    return aws.parse_scheduled(text, seen, lead=300)


def _aws_lifecycle(text: str) -> list[Notice]:
    return aws.parse_lifecycle(text, seen)


def _gcp_preempted(text: str) -> list[Notice]:
    return gcp.parse_preempted(text, "etag", seen, window=30)


def _gcp_maintenance(text: str) -> list[Notice]:
    return gcp.parse_maintenance(text, "etag", seen)


def _gcp_upcoming(text: str) -> list[Notice]:
    gcp.parse_upcoming(text)
    return []


def _azure(text: str) -> list[Notice]:
    return list(azure.parse_events(text, seen, vm_name="vm-1", drain_types=("Preempt", "Terminate"),
                                   default_window=30).notices)


def _azure_instance(text: str) -> list[Notice]:
    azure.parse_instance(text)
    return []


PARSERS = [_aws_instance_action, _aws_rebalance, _aws_scheduled, _aws_lifecycle, _gcp_preempted,
           _gcp_maintenance, _gcp_upcoming, _azure, _azure_instance]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)

# keys and values the parsers look at, so mutated documents get past the first checks
known_keys = st.sampled_from(["action", "time", "noticeTime", "State", "EventId", "Code", "NotBefore",
                              "DocumentIncarnation", "Events", "EventType", "EventStatus", "Resources",
                              "compute", "vmId", "network"])
near_values = st.sampled_from(["terminate", "stop", "active", "canceled", "Preempt", "Started", "vm-1",
                               "2026-11-23T06:02:00Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00",
                               "21 Jan 2019 09:00:43 GMT", "31 Feb 2019 09:00:43 GMT", "", "TRUE", 2, -1,
                               True, ["vm-1"], [1]])
shaped = st.recursive(
    json_values | near_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(known_keys, inner, max_size=6),
    max_leaves=25)

garbage = (st.text() | st.binary().map(lambda b: b.decode("utf-8", "replace"))
           | json_values.map(json.dumps) | shaped.map(json.dumps)
           | st.sampled_from(["<html><body>404 Not Found</body></html>", "[" * 100_000, "1" * 5000,
                              '{"time": "2026-13-01T00:00:00Z", "action": "stop"}', "TRUE\n", " NONE "]))


@pytest.mark.parametrize("parse", PARSERS, ids=lambda p: p.__name__.strip("_"))
@settings(max_examples=300, deadline=None)
@given(text=garbage)
def test_garbage_raises_only_malformed(parse: Any, text: str) -> None:
    try:
        notices = parse(text)
    except MalformedMetadata as exc:
        assert exc.reason
        return
    for notice in notices:  # whatever parsed is a complete, usable notice
        assert isinstance(notice, Notice) and notice.event_id and notice.kind
        assert notice.deadline.tzinfo is not None and notice.detected_at == NOW


times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1)).map(
    lambda d: d.replace(microsecond=0, tzinfo=UTC))
http_dates = times.map(lambda d: d.strftime("%d %b %Y %H:%M:%S GMT"))
ids = st.text("ABCDEF0123456789-", min_size=1, max_size=36)


@given(action=st.sampled_from(["terminate", "stop", "hibernate"]), when=times)
def test_aws_instance_action_round_trip(action: str, when: datetime) -> None:
    body = json.dumps({"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
    [notice] = aws.parse_instance_action(body, seen)
    assert (notice.source, notice.kind, notice.action) == ("aws", "spot-interruption", "drain")
    assert notice.deadline == when and notice.payload == body
    assert aws.parse_instance_action(" " + body, seen)[0].event_id == notice.event_id  # stable id


@given(when=times, action=st.sampled_from(["observe", "drain"]))
def test_aws_rebalance_round_trip(when: datetime, action: Any) -> None:
    [notice] = aws.parse_rebalance(json.dumps({"noticeTime": when.isoformat().replace("+00:00", "Z")}), seen,
                                   action=action)
    assert notice.kind == "rebalance-recommendation" and notice.action == action
    assert notice.deadline == when + timedelta(seconds=120)


@given(events=st.lists(st.tuples(ids, st.sampled_from(["active", "completed", "canceled"]), times,
                                 st.sampled_from(["instance-stop", "system-reboot", "instance-retirement"])),
                       max_size=5, unique_by=lambda e: e[0]),
       lead=st.floats(0, 3600))
def test_aws_scheduled_round_trip(events: list[tuple[str, str, datetime, str]], lead: float) -> None:
    body = json.dumps([{"Code": code, "Description": "x", "EventId": eid, "State": state,
                        "NotBefore": nb.strftime("%d %b %Y %H:%M:%S GMT"), "NotAfter": ""}
                       for eid, state, nb, code in events])
    notices = aws.parse_scheduled(body, seen, lead=lead)
    active = [(eid, nb) for eid, state, nb, _ in events if state == "active"]
    assert [(n.event_id, n.deadline) for n in notices] == active
    for notice in notices:
        assert notice.kind == "scheduled-event" and notice.act_at == notice.deadline - timedelta(seconds=lead)
        assert not notice.due(notice.act_at - timedelta(seconds=1))


@given(state=st.sampled_from(["InService", "Pending", "Standby", "Detached", "Warmed:Running", "Terminated"]))
def test_aws_lifecycle_round_trip(state: str) -> None:
    notices = aws.parse_lifecycle(state + "\n", seen)
    assert [(n.kind, n.deadline) for n in notices] == (
        [("asg-terminated", NOW + timedelta(seconds=aws.ASG_WINDOW))] if state == "Terminated" else [])


@given(etag=st.text("0123456789abcdef", max_size=16), window=st.floats(1, 600))
def test_gcp_preempted_round_trip(etag: str, window: float) -> None:
    assert gcp.parse_preempted("FALSE", etag, seen, window=window) == []
    [notice] = gcp.parse_preempted("TRUE", etag, seen, window=window)
    assert (notice.kind, notice.action, notice.deadline) == ("preemption", "drain", NOW + timedelta(seconds=window))
    assert gcp.parse_preempted("TRUE\n", etag, seen, window=window) == [notice]


# The documented answer of instance/upcoming-maintenance?alt=json (monitor-plan-host-maintenance-event).
UPCOMING = """{
"can_reschedule": "true",
"latest_window_start_time": "2024-12-01T19:00:01Z",
"maintenance_reasons": ["PLANNED_UPDATE", "PLANNED_NETWORK_UPDATE"],
"maintenance_status": "PENDING",
"type": "SCHEDULED",
"window_end_time": "2024-12-01T21:00:01Z",
"window_start_time": "2024-12-01T19:00:01Z"
}"""


def test_gcp_upcoming_maintenance_shapes() -> None:
    assert gcp.parse_upcoming(UPCOMING) == datetime(2024, 12, 1, 19, 0, 1, tzinfo=UTC)
    for nothing in ("{ }", "NONE", '{ "error": "no notifications have been received yet, try again later" }'):
        assert gcp.parse_upcoming(nothing) is None
    for bad in ('{"maintenance_status": "PENDING"}', '["x"]', "<html>", '{"window_start_time": "soon"}'):
        with pytest.raises(MalformedMetadata):
            gcp.parse_upcoming(bad)


def test_gcp_maintenance_uses_the_window_and_the_lead() -> None:
    start = NOW + timedelta(hours=1)
    [early] = gcp.parse_maintenance("TERMINATE_ON_HOST_MAINTENANCE", "e", seen, window_start=start, lead=300)
    assert (early.deadline, early.act_at) == (start, start - timedelta(seconds=300))
    soon = NOW + timedelta(seconds=120)
    [now] = gcp.parse_maintenance("TERMINATE_ON_HOST_MAINTENANCE", "e", seen, window_start=soon, lead=300)
    assert (now.deadline, now.act_at) == (soon, None)
    past = NOW - timedelta(seconds=5)  # an open window: the documented minimum, at once
    [late] = gcp.parse_maintenance("TERMINATE_ON_HOST_MAINTENANCE", "e", seen, window_start=past, lead=300)
    assert (late.deadline, late.act_at) == (NOW + timedelta(seconds=gcp.MAINTENANCE_WINDOW), None)


def test_gcp_maintenance_values() -> None:
    assert gcp.parse_maintenance("NONE", "e", seen) == []
    [drain] = gcp.parse_maintenance("TERMINATE_ON_HOST_MAINTENANCE", "e", seen)
    [observe] = gcp.parse_maintenance("MIGRATE_ON_HOST_MAINTENANCE", "e", seen)
    assert (drain.kind, drain.action, observe.action) == ("maintenance-event", "drain", "observe")
    assert drain.event_id != observe.event_id


azure_events = st.lists(
    st.fixed_dictionaries({
        "EventId": ids, "EventStatus": st.sampled_from(["Scheduled", "Started"]),
        "EventType": st.sampled_from(["Freeze", "Reboot", "Redeploy", "Preempt", "Terminate"]),
        "ResourceType": st.just("VirtualMachine"),
        "Resources": st.lists(st.sampled_from(["vm-1", "VM-1", "vm-2", "vm-3"]), max_size=3),
        "NotBefore": st.one_of(st.just(""), times.map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT"))),
        "Description": st.text(max_size=20), "EventSource": st.sampled_from(["Platform", "User"]),
        "DurationInSeconds": st.integers(-1, 3600)}),
    max_size=5, unique_by=lambda e: e["EventId"])


@given(events=azure_events, incarnation=st.integers(0, 2**31))
def test_azure_round_trip(events: list[dict[str, Any]], incarnation: int) -> None:
    body = json.dumps({"DocumentIncarnation": incarnation, "Events": events})
    document = azure.parse_events(body, seen, vm_name="vm-1", drain_types=("Preempt", "Terminate"),
                                  default_window=45)
    mine = [e for e in events if "vm-1" in [r.lower() for r in e["Resources"]]]
    assert document.incarnation == incarnation
    assert [(n.event_id, n.kind) for n in document.notices] == [(e["EventId"], e["EventType"].lower()) for e in mine]
    for notice, event in zip(document.notices, mine, strict=True):
        assert notice.action == ("drain" if event["EventType"] in ("Preempt", "Terminate") else "observe")
        if event["NotBefore"] and event["EventStatus"] == "Scheduled":
            assert notice.deadline.strftime("%a, %d %b %Y %H:%M:%S GMT") == event["NotBefore"]
        else:
            assert notice.deadline == NOW + timedelta(seconds=45)
        assert json.loads(notice.payload) == event


def test_first_seen_keeps_detection_until_gone() -> None:
    clock = iter([NOW, NOW + timedelta(seconds=5), NOW + timedelta(seconds=9)])
    first = FirstSeen(lambda: next(clock))
    assert first("a") == NOW and first("a") == NOW
    first.keep(["a"])
    assert first("a") == NOW
    first.keep([])
    assert first("a") == NOW + timedelta(seconds=5)  # withdrawn, then back: detected afresh
