"""Every Prometheus metric spotguard exports, on one registry owned by the daemon (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STATES = ("serving", "draining", "drained", "restoring")

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The metric families; modules record through these attributes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.notices = Counter("spotguard_notices_total", "Notices seen, by source, kind and action",
                               ["source", "kind", "action"], registry=r)
        self.withdrawals = Counter("spotguard_notice_withdrawals_total", "Notices withdrawn before acting",
                                   ["source", "kind"], registry=r)
        self.polls = Counter("spotguard_polls_total", "Metadata polls, by source and result",
                             ["source", "result"], registry=r)
        self.poll_errors = Counter("spotguard_poll_errors_total", "Failed metadata polls, by source and reason",
                                   ["source", "reason"], registry=r)
        self.poll_latency = Histogram("spotguard_poll_latency_seconds", "Duration of one metadata poll",
                                      ["source"], buckets=_FAST, registry=r)
        self.last_poll_ok = Gauge("spotguard_last_successful_poll_timestamp_seconds",
                                  "Unix time of the last good poll", ["source"], registry=r)
        self.detection_latency = Histogram(
            "spotguard_detection_latency_seconds",
            "From the notice appearing (its own notice time where the cloud gives one) to our detection",
            ["source"], buckets=_SLOW, registry=r)
        self.state = Gauge("spotguard_state", "1 for the current state", ["state"], registry=r)
        self.ready = Gauge("spotguard_ready", "1 while /readyz answers 200", registry=r)
        self.engine_healthy = Gauge("spotguard_engine_healthy",
                                    "1 while the engine's health URL answers 200 (last check)", registry=r)
        self.gate_accepting = Gauge("spotguard_gate_accepting",
                                    "1 while the gate's listener accepts connections (last check)", registry=r)
        self.cloud_known = Gauge("spotguard_cloud_known",
                                 "0 while [agent] cloud = auto has not been confirmed by a probe yet", registry=r)
        self.deadline = Gauge("spotguard_drain_deadline_timestamp_seconds",
                              "Unix time the VM goes away by the node's deadline (the earliest notice's); "
                              "0 while no drain is under way", registry=r)
        self.step_duration = Histogram("spotguard_drain_step_duration_seconds", "Drain step duration",
                                       ["step", "outcome"], buckets=_SLOW, registry=r)
        self.drain_slack = Gauge("spotguard_drain_slack_seconds",
                                 "Seconds between the end of the last drain and the VM's deadline", registry=r)
        self.drains = Counter("spotguard_drains_total", "Drains finished, by trigger source and result",
                              ["source", "result"], registry=r)
        self.restores = Counter("spotguard_restores_total", "Undrains that put back what a drain changed "
                                "(source = undrain), by result", ["source", "result"], registry=r)
        self.webhooks = Counter("spotguard_webhook_deliveries_total", "Webhook deliveries by result",
                                ["result"], registry=r)
        self.lb_calls = Counter("spotguard_lb_calls_total", "Load-balancer API calls by provider and result",
                                ["provider", "result"], registry=r)
        self.gate_requests = Counter("spotguard_gate_requests_total",
                                     "Requests through the gate by result; malformed: the engine's answer could not "
                                     "be read (checked for every non-streaming answer, every stream a drain reads or that "
                                     "runs past 32 KiB, and one in 16 of the others)",
                                     ["endpoint", "result"], registry=r)
        self.gate_limits = Counter("spotguard_gate_limits_total",
                                   "Times a client-side limit of the gate acted (a refusal, a close, a pause), by "
                                   "its [gate] key; invalid_http: a request refused as malformed or unsupported "
                                   "HTTP", ["limit"], registry=r)
        self.gate_inflight = Gauge("spotguard_gate_inflight_requests", "Requests in flight through the gate",
                                   registry=r)
        self.gate_up = Gauge("spotguard_gate_up", "1 while the gate process answers on its control socket",
                             registry=r)
        self.gate_failures = Counter("spotguard_gate_failures_total",
                                     "Times the daemon lost its gate process (died or stopped answering)", registry=r)
        self.gate_starts = Counter("spotguard_gate_starts_total", "Gate processes started by the daemon",
                                   registry=r)
        self.gate_seam_gap = Histogram("spotguard_gate_seam_gap_seconds",
                                       "Migrated answers: from the local cut to the first byte of the peer's "
                                       "continuation at the client", buckets=_FAST, registry=r)
        self.gate_reprefilled_tokens = Counter("spotguard_gate_reprefilled_tokens_total",
                                               "Output tokens peers prefilled again to continue migrated answers",
                                               registry=r)
        self.resume_held_bytes = Gauge("spotguard_resume_held_bytes",
                                       "Bytes of answers the gate holds for resuming ([resume] max_bytes caps it)",
                                       registry=r)
        self.resume_held_answers = Gauge("spotguard_resume_held_answers", "Answers the gate holds for resuming",
                                         registry=r)
        self.resume_evictions = Counter("spotguard_resume_evictions_total",
                                        "Held answers dropped before their ttl: evicted (the byte cap) or too_big "
                                        "([resume] max_answer_bytes)", ["reason"], registry=r)
        self.resume_index = Counter("spotguard_resume_index_total",
                                    "Answer index objects in the snapshot store: writes and lookups by result",
                                    ["op", "result"], registry=r)
        self.snapshot_bytes = Counter("spotguard_snapshot_bytes_total", "Bytes written to snapshots", ["kind"],
                                      registry=r)
        self.snapshot_objects = Counter("spotguard_snapshot_objects_total", "Snapshot objects by kind and result",
                                        ["kind", "result"], registry=r)
        self.config_errors = Counter("spotguard_errors_total", "Errors handled without crashing, by component",
                                     ["component", "reason"], registry=r)
        self.gpu_count = Gauge("spotguard_gpu_count", "GPUs visible through NVML", registry=r)
        self.gpu_memory_used = Gauge("spotguard_gpu_memory_used_bytes", "GPU memory in use", ["gpu", "uuid"],
                                     registry=r)
        self.gpu_memory_total = Gauge("spotguard_gpu_memory_total_bytes", "GPU memory in all", ["gpu", "uuid"],
                                      registry=r)
        self.nvml_up = Gauge("spotguard_nvml_up", "1 when NVML answered on the last read", registry=r)
        self.set_state("serving")

    def set_state(self, state: str) -> None:
        for name in STATES:
            self.state.labels(state=name).set(1 if name == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
