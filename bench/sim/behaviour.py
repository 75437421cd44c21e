"""Each policy's timeline on an evicted node, from measured figures and the daemon's own drain plan.

Policies, each adding to the one before:

- ``none``: no spotguard: where the cloud shuts the OS down at the notice (GCP), systemd's SIGTERM makes the
  engine answer new requests 503 (its health check stays 200, so the balancer keeps sending them) and cut
  what still runs after its shutdown timeout; elsewhere (AWS, Azure) it serves until the VM goes. The
  balancer takes the node out when its health checks fail after that; clients retry (the openai SDK: 2);
- ``spotguard``: readiness 503 and the gate refusing new work (503 + Retry-After) at detection; running
  requests wait as long as the drain plan allows (``wait_inflight_budget``), then the snapshot cuts them;
- ``peers-zone`` / ``peers-cross``: the gate hands new requests to a peer and continues cut ones there; the
  peer sits in the same zone (a zone-wide eviction takes it too) or in another;
- ``resume``: peers across zones, and what is still cut is resumed elsewhere from the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.sim.errors import SimInputError
from spotguard.config import Config, DrainConfig
from spotguard.drain.serving import wait_inflight_budget

POLICIES = ("none", "spotguard", "peers-zone", "peers-cross", "resume")
LABELS = {"none": "no spotguard", "spotguard": "spotguard, no peers", "peers-zone": "peers, same zone",
          "peers-cross": "peers, other zones", "resume": "peers + resume"}

SIGTERM_AT_NOTICE = {"gcp": True, "aws": False, "azure": False}
"""Whether the OS shutdown (systemd's SIGTERM to the engine) starts at the notice (docs/fleet.md cites each)."""

SDK_MAX_RETRIES = 2
"""openai-python's DEFAULT_MAX_RETRIES (src/openai/_constants.py), what bench/fleet.py's clients use."""
SDK_INITIAL_RETRY_DELAY_S = 0.5
SDK_MAX_RETRY_DELAY_S = 8.0
"""openai-python's backoff without Retry-After: min(0.5 * 2**n, 8) s, less 0-25 % jitter (_base_client.py)."""


@dataclass(frozen=True)
class Client:
    max_retries: int = SDK_MAX_RETRIES
    retry_after_s: float = float(Config().gate.retry_after)
    """What the gate's 503 asks a client to wait ([gate] retry_after); the SDK honours it."""

    def backoff(self, attempt: int, jitter: float) -> float:
        """Seconds before retry ``attempt`` (0-based) when the server gave no Retry-After; ``jitter`` in [0, 1)."""
        return min(SDK_INITIAL_RETRY_DELAY_S * 2.0**attempt, SDK_MAX_RETRY_DELAY_S) * (1 - 0.25 * jitter)


@dataclass(frozen=True)
class Engine:
    tokens_per_s: float
    """Decode speed of one stream."""
    prefill_tokens_per_s: float
    """Prompt tokens a replica prefills per second (a retry's prompt, a migration's output so far)."""


@dataclass(frozen=True)
class Measured:
    """The measured pieces a fleet's behaviours are built from (docs/fleet.md says where each comes from)."""

    detect_s: float
    """Notice -> the node fails its readiness check."""
    health_inter_s: float
    health_fall: int
    """The load balancer's health checks (HAProxy inter/fall; a cloud LB's interval and unhealthy threshold)."""
    lb_after_ready_s: float
    """Readiness 503 -> the load balancer sends nothing new: measured, or the health-check model."""
    refused_without_peers: float
    handed_ok: float
    migrated_ok: float
    seam_s: float
    resume_delay_s: float | None = None


@dataclass(frozen=True)
class Behaviour:
    policy: str
    window_s: float
    refuses_at_s: float
    """From here on the node answers new requests 503."""
    refusal_retry_after: bool
    """The 503 carries Retry-After (the gate's) or not (the engine's own)."""
    cut_at_s: float
    """Requests still running locally are cut here."""
    lb_stop_s: float
    """The load balancer sends this node nothing new after this."""
    lb_redispatch: bool
    """A connection to the node once it is gone is retried elsewhere by the balancer itself (HAProxy
    ``option redispatch``), so the client never sees it."""
    refused_share: float
    peers: str
    handed_ok: float
    migrated_ok: float
    seam_s: float
    resume_delay_s: float | None
    peer_miss: float = 0.0
    """Chance that a hand-off or migration lands back on this node while the balancer still routes to it
    (when the peer is the balancer itself, as in bench/fleet.py); it fails then."""
    drain_deadline_s: float = 0.0
    """When the drain must be over (the window less the safety margin): with peers, a request that would
    still be running then is handed over when the drain begins (``refuses_at_s``), not at ``cut_at_s``
    (the gate's estimate, gate/estimate.py, taken as exact here)."""

    @property
    def label(self) -> str:
        return LABELS[self.policy]


def health_delay_s(inter_s: float, fall: int) -> float:
    """Mean time from a node failing its checks to the balancer taking it out: ``fall`` failed checks, the
    first half an interval away on average."""
    return (fall - 0.5) * inter_s


def behaviours(measured: Measured, window_s: float, *, sigterm_at_notice: bool, engine_shutdown_timeout_s: float,
               lb_redispatch: bool = True, drain: DrainConfig | None = None, snapshot: bool = True,
               policies: tuple[str, ...] = POLICIES) -> dict[str, Behaviour]:
    """The timeline of each policy for a notice ``window_s`` seconds before the VM goes."""
    drain = drain or Config().drain
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SimInputError(f"unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    if "resume" in policies and measured.resume_delay_s is None:
        raise SimInputError("the resume policy needs a measurement with resume (--resume-json)")
    detect = min(measured.detect_s, window_s)
    left = max(0.0, window_s - drain.safety_margin - detect)
    lb_stop = detect + measured.lb_after_ready_s
    dead_until = window_s + health_delay_s(measured.health_inter_s, measured.health_fall)
    out = {}
    for policy in policies:
        if policy == "none":
            refuses, cut = ((0.0, min(window_s, engine_shutdown_timeout_s)) if sigterm_at_notice
                            else (window_s, window_s))
            out[policy] = Behaviour(policy, window_s, refuses, False, cut, dead_until, lb_redispatch, 1.0, "",
                                    0.0, 0.0, 0.0, None)
            continue
        peers = {"peers-zone": "zone", "peers-cross": "cross", "resume": "cross"}.get(policy, "")
        cut = detect + wait_inflight_budget(left, drain, snapshot=snapshot, peers=bool(peers))
        out[policy] = Behaviour(policy, window_s, detect, True, min(cut, window_s), min(lb_stop, dead_until),
                                lb_redispatch, measured.refused_without_peers, peers, measured.handed_ok, measured.migrated_ok,
                                measured.seam_s, measured.resume_delay_s if policy == "resume" else None,
                                drain_deadline_s=detect + left)
    return out
