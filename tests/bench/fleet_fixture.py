"""A ``bench/fleet.py --json`` document written by hand, in that bench's schema and design, for the simulator's
tests beside the measured ``bench/data/fleet.json``: it holds losses the measured run with resume no longer has.

Its baseline counts are the ones the fleet issue quoted from an early measurement (without spotguard lost 0/81,
0/2, 1/2, 0/26); spotguard's are today's product without the resumable client (0/85, 0/2, 1/2, 0/26: a
request that cannot finish locally is handed over when the drain begins, and a peer that is the balancer is
tried again when it routes the request back, so only the stream relayed until the VM goes is lost without
resume); its requests follow bench/fleet.py's design: 3 nodes, a 12 s window,
engines at 50 tokens/s, the long requests sent 1.5 s before the notice (375 tokens "finishable", 975
"outlasting", a stream and a plain call each), 20-token background requests from 3 clients, HAProxy
checks 1 s apart, DOWN after 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WINDOW = 12.0
RATE = 50.0


def _request(cls: str, sent: float, tokens: int, stream: bool, lost: bool, latency: float | None) -> dict[str, Any]:
    return {"class": cls, "stream": stream, "lost": lost, "tokens": 0 if lost else tokens, "expected_tokens": tokens,
            "sent_at_s": round(sent, 3), "latency_s": None if lost else latency,
            "error": "APIConnectionError: Connection error." if lost else None}


def _round(*, during: int, others_before: int, others_after: int, lost: dict[str, list[bool]], generated: int,
           lb_down: float, spotguard: bool) -> dict[str, Any]:
    requests = [_request("during_drain", (i + 0.5) * (WINDOW - 0.2) / during, 20, i % 2 == 0, False, 0.45)
                for i in range(during)]
    requests += [_request("others", -4.0 + i * 3.9 / others_before, 20, i % 2 == 0, False, 0.41)
                 for i in range(others_before)]
    requests += [_request("others", WINDOW + 0.1 + i * 0.3, 20, i % 2 == 0, False, 0.42) for i in range(others_after)]
    for cls, tokens in (("finishable", 375), ("outlasting", 975)):
        for stream, was_lost in zip((True, False), lost[cls], strict=True):
            requests.append(_request(cls, -1.5, tokens, stream, was_lost, tokens / RATE + (0 if cls == "finishable" else 14)))
    classes = {name: {"total": sum(r["class"] == name for r in requests),
                      "lost": sum(r["class"] == name and r["lost"] for r in requests)}
               for name in ("during_drain", "finishable", "outlasting", "others")}
    delivered = sum(r["expected_tokens"] for r in requests if not r["lost"])
    steps = ([{"name": "readiness", "outcome": "ok", "duration_s": 0.0},
              {"name": "wait_inflight", "outcome": "timed_out", "duration_s": 1.05},
              {"name": "migrate", "outcome": "ok", "duration_s": 0.01},
              {"name": "snapshot", "outcome": "ok", "duration_s": 0.02}] if spotguard else [])
    return {"classes": classes, "tokens_generated": generated, "tokens_delivered": delivered,
            "requests": sorted(requests, key=lambda r: r["sent_at_s"]), "lb_down_after_s": lb_down,
            "killed_after_s": WINDOW + 0.01, "drain_steps": steps, "seam_gaps_s": [0.21] if spotguard else [],
            "streams_client": "spotguard.client.resumable_async_http_client is MISSING: streams use a plain httpx "
                              "client (nothing resumes them)" if spotguard else "plain SDK clients"}


RESUMABLE = "streams through spotguard.client.resumable_async_http_client()"


def document(*, spotguard_during_lost: int = 0, resumed_after_s: float | None = None) -> dict[str, Any]:
    """The whole document; ``spotguard_during_lost`` marks that many of spotguard's during-drain requests
    lost (a measurement the model must NOT match); ``resumed_after_s``: spotguard's streams went through the
    resumable client and its outlasting stream completed that many seconds late."""
    base_lost = {"finishable": [False, False], "outlasting": [True, False]}
    guard_lost = {"finishable": [False, False], "outlasting": [True, False]}
    baseline = [_round(during=81, others_before=20, others_after=6, lost=base_lost, generated=5185, lb_down=14.7,
                       spotguard=False),
                _round(during=79, others_before=20, others_after=6, lost=base_lost, generated=5160, lb_down=14.6,
                       spotguard=False)]
    guard = [_round(during=85, others_before=20, others_after=6, lost=guard_lost, generated=5027, lb_down=2.7,
                    spotguard=True),
             _round(during=83, others_before=20, others_after=6, lost=guard_lost, generated=4985, lb_down=2.8,
                    spotguard=True)]
    for round_ in guard:
        if resumed_after_s is not None:  # with resume nothing is lost, and only the plain calls' retries waste
            round_["streams_client"] = RESUMABLE
            for request in round_["requests"]:
                if request["class"] in ("finishable", "outlasting") and request["stream"]:
                    tokens = request["expected_tokens"]
                    request.update(lost=False, tokens=tokens, error=None, latency_s=tokens / RATE + resumed_after_s)
            for cls in ("finishable", "outlasting"):
                round_["classes"][cls]["lost"] = 0
            round_["tokens_delivered"] = sum(r["expected_tokens"] for r in round_["requests"] if not r["lost"])
            round_["tokens_generated"] = round_["tokens_delivered"] + 500
        marked = 0
        for request in round_["requests"]:
            if request["class"] == "during_drain" and marked < spotguard_during_lost:
                request["lost"], marked = True, marked + 1
        round_["classes"]["during_drain"]["lost"] = marked
    return {"bench": "fleet", "version": 1, "command": "bench/fleet.py --rounds 2 --json FILE (fixture)",
            "started_at": "2026-12-02T13:00:00Z",
            "setup": {"nodes": 3, "window_s": WINDOW, "tokens_per_s": RATE,
                      "health": {"inter_s": 1.0, "fall": 3, "rise": 2}, "rounds": 2, "clients": 3,
                      "short_tokens": 20, "lead_s": 1.5, "engine_shutdown_timeout_s": WINDOW,
                      "lb": {"haproxy": "roundrobin, retries 1, option redispatch"}},
            "variants": {"baseline": {"rounds": baseline}, "spotguard": {"rounds": guard}}}


def write(path: Path, **kwargs: Any) -> Path:
    path.write_text(json.dumps(document(**kwargs)))
    return path

