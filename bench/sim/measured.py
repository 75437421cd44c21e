"""What one node was measured to do: the JSON of ``bench/fleet.py`` and ``bench/migrate.py``, checked.

``bench/fleet.py --json`` (version 1)::

    {"bench": "fleet", "version": 1, "setup": {"nodes": 3, "window_s": 12.0, "tokens_per_s": 50.0,
     "health": {"inter_s": 1.0, "fall": 3, "rise": 2}, "rounds": 2, ...},
     "variants": {"baseline": {"rounds": [ROUND, ...]}, "spotguard": {"rounds": [ROUND, ...]}}}
    ROUND = {"classes": {"during_drain": {"total": n, "lost": n}, "finishable": ..., "outlasting": ...,
                         "others": ...},
             "tokens_generated": n, "tokens_delivered": n,
             "requests": [{"class", "stream", "lost", "tokens", "expected_tokens", "sent_at_s", "latency_s",
                           "error"}, ...],
             "lb_down_after_s": s | null, "drain_steps": [{"name", "outcome", "duration_s"}], "seam_gaps_s": [s]}

``bench/migrate.py --json``: a list of rows, one per variant (``baseline``: no peers; ``peers``), with
``streams``, ``completed``, ``new_requests_sent``, ``new_requests_failed``, ``seam_gap_p50_ms``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.sim.errors import SimInputError
from bench.sim.workload import Request

CLASSES = ("during_drain", "finishable", "outlasting", "others")
"""Request classes of bench/fleet.py: sent after the notice while the VM lives; in flight at the notice and
able to finish within the window; in flight and unable to; everything else."""


@dataclass(frozen=True)
class ClassCount:
    total: int
    lost: int


@dataclass(frozen=True)
class ReplayRequest:
    cls: str
    request: Request
    lost: bool
    latency_s: float | None


@dataclass(frozen=True)
class Round:
    classes: dict[str, ClassCount]
    tokens_generated: int
    tokens_delivered: int
    requests: tuple[ReplayRequest, ...]
    lb_down_after_s: float | None
    drain_steps: dict[str, float]
    seam_gaps_s: tuple[float, ...]
    streams_client: str = ""
    """How the round's streams were sent (bench/fleet.py notes whether the resumable client was there)."""

    @property
    def resumable(self) -> bool:
        return "through spotguard.client.resumable" in self.streams_client


@dataclass(frozen=True)
class FleetBench:
    """One ``bench/fleet.py`` run: its setup and, per variant, its rounds."""

    path: str
    setup: dict[str, Any]
    variants: dict[str, tuple[Round, ...]]

    @property
    def window_s(self) -> float:
        return float(self.setup["window_s"])

    @property
    def tokens_per_s(self) -> float:
        return float(self.setup["tokens_per_s"])

    @property
    def nodes(self) -> int:
        return int(self.setup["nodes"])

    @property
    def health(self) -> tuple[float, int]:
        health = self.setup.get("health") or {}
        return float(health.get("inter_s", 1.0)), int(health.get("fall", 3))

    def lb_down_after_s(self, variant: str) -> float | None:
        values = [r.lb_down_after_s for r in self.variants.get(variant, ()) if r.lb_down_after_s is not None]
        return statistics.median(values) if values else None

    @property
    def engine_shutdown_timeout_s(self) -> float:
        """How long the engine lets running requests go on after SIGTERM (the bench: the window)."""
        return float(self.setup.get("engine_shutdown_timeout_s", self.window_s))

    @property
    def lb_redispatch(self) -> bool:
        return "redispatch" in str((self.setup.get("lb") or {}).get("haproxy", "option redispatch"))

    def resumable(self, variant: str) -> bool:
        return any(r.resumable for r in self.variants.get(variant, ()))

    def seam_gaps_s(self) -> list[float]:
        return [gap for rounds in self.variants.values() for r in rounds for gap in r.seam_gaps_s]


@dataclass(frozen=True)
class MigrateBench:
    """``bench/migrate.py``: what a drain does to running and new requests without and with peers."""

    path: str
    refused_without_peers: float
    """Share of new requests answered 503 during a drain without peers."""
    migrated_ok: float
    """Share of running streams completed through a peer."""
    handed_ok: float
    """Share of new requests during the drain that a peer served."""
    seam_s: float
    """Median pause at the seam of a migrated stream, seconds (includes the peer's re-prefill there)."""


def _number(value: object, where: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SimInputError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SimInputError(f"{where}: expected a count >= 0, got {value!r}")
    return value


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise SimInputError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise SimInputError(f"{path}: not JSON: {exc}") from exc


def _round(raw: object, where: str) -> Round:
    if not isinstance(raw, dict):
        raise SimInputError(f"{where}: a round must be an object")
    classes_raw = raw.get("classes")
    if not isinstance(classes_raw, dict) or set(CLASSES) - set(classes_raw):
        raise SimInputError(f"{where}.classes: expected the classes {', '.join(CLASSES)}")
    classes = {}
    for name in CLASSES:
        entry = classes_raw[name]
        if not isinstance(entry, dict):
            raise SimInputError(f"{where}.classes.{name}: expected {{total, lost}}")
        total = _count(entry.get("total"), f"{where}.classes.{name}.total")
        lost = _count(entry.get("lost"), f"{where}.classes.{name}.lost")
        if lost > total:
            raise SimInputError(f"{where}.classes.{name}: lost {lost} > total {total}")
        classes[name] = ClassCount(total, lost)
    offset = float(_number(raw.get("notice_at_s", 0.0), f"{where}.notice_at_s") or 0.0)
    requests = []
    for index, item in enumerate(raw.get("requests") or []):
        at = f"{where}.requests[{index}]"
        if not isinstance(item, dict) or item.get("class") not in CLASSES:
            raise SimInputError(f"{at}: expected an object whose class is one of {', '.join(CLASSES)}")
        sent = _number(item.get("sent_at_s"), f"{at}.sent_at_s")
        assert sent is not None
        request = Request(sent - offset, int(item.get("input_tokens", 0)),
                          _count(item.get("expected_tokens"), f"{at}.expected_tokens"), bool(item.get("stream")))
        requests.append(ReplayRequest(item["class"], request, bool(item.get("lost")),
                                      _number(item.get("latency_s"), f"{at}.latency_s", allow_none=True)))
    steps = {}
    for step in raw.get("drain_steps") or []:
        if isinstance(step, dict) and isinstance(step.get("name"), str):
            steps[step["name"]] = float(_number(step.get("duration_s"), f"{where}.drain_steps.duration_s") or 0.0)
    gaps = tuple(float(_number(g, f"{where}.seam_gaps_s") or 0.0) for g in raw.get("seam_gaps_s") or [])
    return Round(classes, _count(raw.get("tokens_generated"), f"{where}.tokens_generated"),
                 _count(raw.get("tokens_delivered"), f"{where}.tokens_delivered"), tuple(requests),
                 _number(raw.get("lb_down_after_s"), f"{where}.lb_down_after_s", allow_none=True), steps, gaps,
                 str(raw.get("streams_client") or ""))


def load_fleet(path: Path) -> FleetBench:
    """A ``bench/fleet.py --json`` file, checked against version 1 of its schema."""
    doc = _read(path)
    if not isinstance(doc, dict) or doc.get("bench") != "fleet":
        raise SimInputError(f'{path}: not a bench/fleet.py result (no "bench": "fleet")')
    if doc.get("version") != 1:
        raise SimInputError(f"{path}: version {doc.get('version')!r} of bench/fleet.py's JSON; this reads version 1")
    setup = doc.get("setup")
    if not isinstance(setup, dict):
        raise SimInputError(f"{path}: setup must be an object")
    for key in ("nodes", "window_s", "tokens_per_s"):
        if _number(setup.get(key), f"{path}: setup.{key}") is None or float(setup[key]) <= 0:
            raise SimInputError(f"{path}: setup.{key} must be positive")
    variants_raw = doc.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise SimInputError(f"{path}: variants must name at least one variant")
    variants = {}
    for name, body in variants_raw.items():
        rounds = body.get("rounds") if isinstance(body, dict) else None
        if not isinstance(rounds, list) or not rounds:
            raise SimInputError(f"{path}: variants.{name}.rounds must be a non-empty list")
        variants[name] = tuple(_round(r, f"{path}: variants.{name}.rounds[{i}]") for i, r in enumerate(rounds))
    return FleetBench(str(path), setup, variants)


def load_migrate(path: Path) -> MigrateBench:
    """A ``bench/migrate.py --json`` file: its baseline and peers rows."""
    doc = _read(path)
    rows = {row.get("variant"): row for row in doc if isinstance(row, dict)} if isinstance(doc, list) else {}
    if "baseline" not in rows or "peers" not in rows:
        raise SimInputError(f"{path}: expected bench/migrate.py's rows for the variants baseline and peers")

    def share(row: dict[str, Any], part: str, whole: str) -> float:
        total = _count(row.get(whole), f"{path}: {row['variant']}.{whole}")
        done = _count(row.get(part), f"{path}: {row['variant']}.{part}")
        if total == 0 or done > total:
            raise SimInputError(f"{path}: {row['variant']}: {part} {done} of {whole} {total}")
        return done / total

    base, peers = rows["baseline"], rows["peers"]
    seam_ms = _number(peers.get("seam_gap_p50_ms"), f"{path}: peers.seam_gap_p50_ms")
    assert seam_ms is not None
    return MigrateBench(str(path), share(base, "new_requests_failed", "new_requests_sent"),
                        share(peers, "completed", "streams"),
                        1.0 - share(peers, "new_requests_failed", "new_requests_sent"), seam_ms / 1000)


def load_detect(path: Path) -> dict[str, float]:
    """``bench/detect.py --out``: median seconds from a notice to ``/readyz`` 503, per cloud, at the default
    1 s poll interval (GCP's hanging GET does not poll)."""
    doc = _read(path)
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, list):
        raise SimInputError(f'{path}: not a bench/detect.py result (no "runs")')
    found = {}
    for run in runs:
        if isinstance(run, dict) and run.get("poll_interval") == 1.0 and isinstance(run.get("cloud"), str):
            found[run["cloud"]] = float(_number(run.get("p50"), f"{path}: {run['cloud']}.p50") or 0.0)
    if not found:
        raise SimInputError(f"{path}: no run at the default 1 s poll interval")
    return found
