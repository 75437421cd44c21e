"""Configuration: one frozen object, built once from file -> environment -> CLI, passed explicitly.

Every key lives in a section dataclass below; its ``help`` metadata is the reference documentation
(``spotguard config show --doc`` and ``docs/operations.md`` are generated from it). A key
``[section] name`` is also settable as the environment variable ``SPOTGUARD_SECTION_NAME``.
Reading, type checks, TOML and reference output are ``config_schema``'s; the rules that tie keys
together are ``config_rules``'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotguard import config_schema as schema
from spotguard.config_rules import parse_allow as parse_allow
from spotguard.config_rules import parse_listen as parse_listen
from spotguard.config_rules import validate
from spotguard.config_schema import option as _opt
from spotguard.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/spotguard/spotguard.toml")
ENV_PREFIX = "SPOTGUARD_"
# Variables under the prefix that are not configuration keys: where the config file is, and the build/test tool
# cache the Makefile exports. Listed so they do not trip the unknown-variable check, which exists to catch typos.
ENV_NOT_CONFIG = frozenset({"SPOTGUARD_CONFIG", "SPOTGUARD_CACHE", "SPOTGUARD_LLAMA_SERVER"})


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    cloud: str = _opt("auto", "Which cloud's notices to watch; auto = detect from DMI, confirmed by a probe.",
                      choices=("auto", "aws", "gcp", "azure", "none"))
    poll_interval: float = _opt(1.0, "Seconds between metadata polls (AWS, Azure; GCP fallback polling).")
    request_timeout: float = _opt(2.0, "Timeout in seconds of one metadata request.")
    max_backoff: float = _opt(5.0, "Upper bound in seconds of the retry backoff after a failed poll.")
    state_dir: str = _opt("/var/lib/spotguard", "Where the drain state is persisted (survives restarts).")
    log_format: str = _opt("auto", "Log format: json, console, or auto (console on a TTY).",
                           choices=("auto", "json", "console"))
    log_level: str = _opt("info", "Minimum log level.", choices=("debug", "info", "warning", "error"))
    dry_run: bool = _opt(False, "Log what each drain step would do, and do nothing.")
    instance_id: str = _opt("", "Instance id used in snapshot keys; empty = from metadata, else hostname.")


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    listen: str = _opt("0.0.0.0:9901", "host:port of /healthz, /readyz, /metrics and /status (read-only).")


@dataclass(frozen=True, kw_only=True)
class AwsConfig:
    metadata_url: str = _opt("http://169.254.169.254", "Base URL of the EC2 instance metadata service.")
    imds_version: str = _opt("v2", "v2 uses session tokens; v1 only where IMDSv1 is deliberately allowed.",
                             choices=("v1", "v2"))
    token_ttl: int = _opt(21600, "IMDSv2 token lifetime in seconds (1..21600); refreshed before expiry.")
    rebalance_action: str = _opt("observe", "Rebalance recommendations: observe (count, report) or drain.",
                                 choices=("observe", "drain"))
    slow_poll_interval: float = _opt(5.0, "Seconds between polls of the documents that warn minutes to days ahead "
                                          "(rebalance, scheduled events, ASG lifecycle state); the spot "
                                          "instance-action keeps [agent] poll_interval.")
    scheduled_lead: float = _opt(300.0, "Drain this many seconds before an active scheduled event's NotBefore.")
    region: str = _opt("", "AWS region for API calls; empty = from instance metadata.")
    endpoint_url: str = _opt("", "API endpoint override (an API-compatible server such as moto).")
    target_group_arns: tuple[str, ...] = _opt([], "ELBv2 target groups to deregister this instance from.")
    target_port: int = _opt(0, "Port registered in the target groups; 0 = deregister by instance id only.")
    lifecycle_hook: str = _opt("", "ASG lifecycle hook to heartbeat and complete when the drain ends.")
    autoscaling_group: str = _opt("", "ASG name for the lifecycle hook; empty = from the instance's tags.")


@dataclass(frozen=True, kw_only=True)
class GcpConfig:
    metadata_url: str = _opt("http://metadata.google.internal", "Base URL of the GCE metadata server.")
    window: float = _opt(30.0, "Seconds between detecting preemption and the hard power-off.")
    hanging_timeout: int = _opt(60, "timeout_sec of each hanging GET on instance/preempted.")
    maintenance_lead: float = _opt(300.0, "Drain this many seconds before a host-maintenance window starts "
                                          "(instance/upcoming-maintenance; GPU VMs are told an hour ahead). "
                                          "Without a window start, TERMINATE_ON_HOST_MAINTENANCE drains at once.")
    instance_groups: tuple[str, ...] = _opt([], "Unmanaged instance groups to leave, as zones/Z/instanceGroups/N.")
    network_endpoint_groups: tuple[str, ...] = _opt([], "Zonal NEGs to detach from, as zones/Z/networkEndpointGroups/N.")
    neg_port: int = _opt(0, "Port of this VM's endpoint in the NEGs.")
    compute_url: str = _opt("https://compute.googleapis.com/compute/v1", "Compute REST base URL.")


@dataclass(frozen=True, kw_only=True)
class AzureConfig:
    metadata_url: str = _opt("http://169.254.169.254", "Base URL of Azure IMDS (Scheduled Events).")
    drain_event_types: tuple[str, ...] = _opt(["Preempt", "Terminate"],
                                              "Scheduled event types that start a drain (add Reboot, Redeploy, Freeze "
                                              "to taste); matched case-insensitively.")
    default_window: float = _opt(30.0, "Deadline in seconds from detection when NotBefore is blank or Started.")
    acknowledge: bool = _opt(True, "Approve the event (StartRequests) once the drain has ended.")
    vm_name: str = _opt("", "This VM's name as it appears in Resources; empty = ask IMDS.")
    backend_pools: tuple[str, ...] = _opt([], "ARM ids of load-balancer backend pools to leave.")
    arm_url: str = _opt("https://management.azure.com", "Azure Resource Manager base URL.")


@dataclass(frozen=True, kw_only=True)
class ShutdownConfig:
    enabled: bool = _opt(True, "Treat SIGTERM while serving as a notice (on GCP it often is the only one).")
    budget: float = _opt(25.0, "Seconds the drain may take after SIGTERM.")
    trigger: str = _opt("system-shutdown", "When SIGTERM drains a serving node: system-shutdown (only while "
                        "systemd says the machine is stopping, or when that cannot be told; restarting spotguard "
                        "alone does not drain) or always.", choices=("always", "system-shutdown"))


@dataclass(frozen=True, kw_only=True)
class ControlConfig:
    socket: str = _opt("/run/spotguard/control.sock", "Unix socket for drain/undrain/status (never TCP).")
    mode: str = _opt("0660", "Permission bits of the control socket, octal.")
    group: str = _opt("", "Group owning the control socket; empty = the daemon's group.")


@dataclass(frozen=True, kw_only=True)
class DrainConfig:
    safety_margin: float = _opt(5.0, "The drain must end this many seconds before the notice's deadline.")
    manual_deadline: float = _opt(120.0, "Deadline in seconds of a manual drain without --deadline.")
    wait_inflight_budget: float = _opt(60.0, "Most seconds to wait for running requests to finish.")
    stop_budget: float = _opt(10.0, "Most seconds for the engine's stop action.")
    deregister_budget: float = _opt(15.0, "Most seconds for load-balancer deregistration.")
    snapshot_budget: float = _opt(30.0, "Most seconds for saving in-flight context.")
    notify_budget: float = _opt(10.0, "Most seconds for webhooks.")
    restore_budget: float = _opt(60.0, "Most seconds an undrain may take to put back what the drain changed "
                                 "(start the engine's unit, reopen the gate, re-register with load balancers).")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    kind: str = _opt("none", "Inference engine adapter.",
                     choices=("none", "vllm", "sglang", "tgi", "triton", "llamacpp", "http", "command"))
    url: str = _opt("", "Base URL of the engine's HTTP API.")
    health_url: str = _opt("", "The engine's readiness URL, checked about once a second for /readyz; empty = the "
                           "kind's own (vllm, sglang, tgi, llamacpp: url + /health; triton: url + "
                           "/v2/health/ready); none for http, command and none unless set.")
    metrics_url: str = _opt("", "Prometheus endpoint of the engine; empty = url + /metrics.")
    unit: str = _opt("", "systemd unit of the engine (signalled with systemctl kill).")
    pid_file: str = _opt("", "File holding the engine's pid.")
    pid: int = _opt(0, "The engine's pid.")
    stop_signal: str = _opt("SIGTERM", "Signal that asks the engine to drain.")
    stop_command: tuple[str, ...] = _opt([], "argv run to stop the engine (kind = command); never a shell.")
    inflight_command: tuple[str, ...] = _opt([], "argv printing the in-flight count (kind = command).")
    stop_url: str = _opt("", "URL to call to stop the engine (kind = http).")
    stop_method: str = _opt("POST", "HTTP method of stop_url.")
    stop_body: str = _opt("", "Body sent to stop_url (JSON text).")
    inflight_url: str = _opt("", "URL returning the in-flight count (kind = http).")
    inflight_json_path: str = _opt("", "Dotted path of the count in inflight_url's JSON (empty = whole body).")
    triton_models: tuple[str, ...] = _opt([], "Triton models to unload (explicit model control).")
    timeout: float = _opt(5.0, "Seconds one call to the engine may take (HTTP request, systemctl, "
                               "stop_command or inflight_command); the drain step's budget still applies.")


@dataclass(frozen=True, kw_only=True)
class WebhookConfig:
    urls: tuple[str, ...] = _opt([], "URLs POSTed on drain start and drain end.")
    template: str = _opt("", "JSON body template with {event}, {state}, {source}, {kind}, {instance}, {reason}, "
                             "{seconds_left}; empty = Slack-compatible text.")
    timeout: float = _opt(5.0, "Timeout in seconds of one webhook request.")


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    listen: str = _opt("", "host:port of the gate (reverse proxy in front of the engine); empty = off.")
    upstream: str = _opt("", "Base URL of the engine behind the gate.")
    retry_after: int = _opt(5, "Retry-After seconds sent with 503 once draining.")
    start: str = _opt("auto", "Who runs the gate process (`spotguard gate`): auto = `spotguard run` starts it when "
                              "none answers on control_socket and starts it again if it dies; external = a "
                              "service manager does (systemd's spotguard-gate.service), the daemon only attaches.",
                      choices=("auto", "external"))
    control_socket: str = _opt("", "Unix socket between the daemon and the gate process; empty = gate.sock beside "
                                   "[control] socket.")
    stop_timeout: float = _opt(30.0, "On SIGTERM the gate stops accepting, then waits this many seconds for "
                                     "requests in flight before closing them.")
    peers: tuple[str, ...] = _opt([], "Base URLs of OpenAI-compatible endpoints that take work from this node while "
                                  "it drains (other nodes' gates or engines, or the internal load balancer): new "
                                  "requests are handed to them; running requests that will not finish before the "
                                  "drain deadline are continued there as the drain begins, and the migrate step "
                                  "continues what is still running after the wait, each into the same client "
                                  "answer. Empty = refuse new work with 503 and end cut answers with a retryable "
                                  "error.")
    allow_paths: tuple[str, ...] = _opt([], "Paths forwarded beyond the inference API (OpenAI chat, completions, "
                                        "embeddings, responses, models; health), as \"/path\", \"/prefix/*\" or "
                                        "\"METHOD /path\". Everything else gets 403: admin endpoints (llama.cpp "
                                        "/slots, vLLM /pause, SGLang /flush_cache) let any client of the API erase "
                                        "other users' state or stop the engine. Open only what the clients need.")
    head_timeout: float = _opt(60.0, "Seconds a client has to send a whole request head, and a new connection its "
                                     "first request (nginx client_header_timeout): a slow or silent client is "
                                     "closed (408 when it had begun a head).")
    body_timeout: float = _opt(60.0, "Seconds a request body may stall between two reads (nginx "
                                     "client_body_timeout): then 408 and the connection closes. Time the gate "
                                     "itself holds reading (the engine reads slowly) does not count.")
    keepalive_timeout: float = _opt(75.0, "Seconds an idle kept-alive client connection stays open "
                                          "(nginx keepalive_timeout).")
    max_connections: int = _opt(1024, "Client connections held at once (nginx worker_connections); past it the "
                                      "oldest idle one is closed, or the new one gets 503 when none is idle. "
                                      "Lowered at start to fit the file descriptor limit (half of it).")
    max_headers: int = _opt(100, "Headers one request may have (Apache LimitRequestFields); more: 431.")
    max_head: int = _opt(32768, "Bytes a request line and headers may take, however they arrive (nginx "
                                "large_client_header_buffers 4 8k); more: 431 (414 for the line alone).")
    read_ahead: int = _opt(65536, "Bytes of pipelined requests read while an earlier one on the same connection "
                                  "is served; then reading pauses until their turn.")
    max_body: int = _opt(64 << 20, "Largest request body the gate holds in memory (journaled chat/completions, "
                                   "requests handed to peers); bigger: 413. nginx's 1 MiB client_max_body_size "
                                   "is too small for LLM APIs: OpenAI's API takes up to 50 MB of image bytes per "
                                   "request, 66.7 MB as base64 inline (64 MiB is 67.1 MB).")
    body_memory: int = _opt(256 << 20, "Bytes of request bodies all clients together may have held in memory; "
                                       "past it new bodies get 503 with Retry-After. At least max_body.")


@dataclass(frozen=True, kw_only=True)
class SnapshotConfig:
    url: str = _opt("", "Store URL with prefix: s3://, gs://, az://, file://; empty = no snapshots.")
    encryption_key_file: str = _opt("", "32-byte key file for client-side AES-GCM; empty = off.")
    endpoint_url: str = _opt("", "Object store endpoint override (moto, Azurite, MinIO).")
    slot_save_path: str = _opt("", "llama-server --slot-save-path, for KV slot files.")
    model_path: str = _opt("", "Model file of the engine (its sha256 is stored beside KV files).")
    server_side_encryption: str = _opt("", "S3 server-side encryption asked of the store; empty = the bucket's default.",
                                       choices=("", "AES256", "aws:kms", "aws:kms:dsse"))
    sse_kms_key_id: str = _opt("", "KMS key id/ARN for aws:kms or aws:kms:dsse; empty = the account's default key.")
    kv_cache_types: str = _opt("f16,f16", "llama-server KV cache types as K,V (its --cache-type-k/-v); "
                               "kept beside KV files because the engine does not report them.")


DEFAULT_HELD_BYTES = 256 << 20
"""Why 256 MiB: an SSE event of an OpenAI chat stream is about 300 bytes with its ``id:`` line, so 200 streams
of 1,000 tokens each hold about 60 MiB while they run; the rest keeps finished answers for their ttl (the
finished go first when the cap is reached). A small share of a GPU VM's memory, and the gate's alone."""


@dataclass(frozen=True, kw_only=True)
class ResumeConfig:
    key_file: str = _opt("", "The fleet's resume secret: 32 raw bytes or 64 hex characters, the same file on every "
                         "node (head -c 32 /dev/urandom > FILE; mode 0600). It signs the cursors clients get and "
                         "names the answers of retried requests. Empty = resume off: a cut answer ends with a "
                         "retryable error and a retry is computed again.")
    ttl: float = _opt(600.0, "Seconds an answer stays resumable: a held answer after its last event, an index "
                      "object after its cut, a cursor after the event it names.")
    max_bytes: int = _opt(DEFAULT_HELD_BYTES, "Memory cap in bytes of the answers the gate holds for resuming "
                          "(their events and request bodies); past it the oldest go first, finished ones before "
                          "running ones. 256 MiB holds 200 running streams of 1,000 tokens with room to spare.")
    max_answer_bytes: int = _opt(16 << 20, "Largest answer the gate holds, in bytes: one that grows past it is "
                                 "dropped from the book (it still reaches its client) instead of pushing every "
                                 "other answer out. Capped at max_bytes.")
    advertise: str = _opt("", "Base URL on which other gates reach this gate's data port (http://10.0.0.5:8001), "
                          "named in cursors as the answer's holder. Empty = the [gate] listen host when it is "
                          "one address, else (0.0.0.0, ::) the VM's private IP from its identity; with the [gate] "
                          "listen port.")
    index: bool = _opt(True, "Write an index object per cut answer (request, output so far, holder) under "
                       "_answers/ in the [snapshot] store, so a retry that lands anywhere is continued from it "
                       "when the holder is gone. Needs [snapshot] url; encrypted with [snapshot] "
                       "encryption_key_file when one is set.")
    lookup_timeout: float = _opt(2.0, "Most seconds a retried request waits for the index lookup before it is "
                                 "computed afresh.")
    keep_generating: bool = _opt(True, "A client that goes away mid-answer leaves the engine generating it, held "
                                 "for ttl, so that the client can resume it (the openai SDK's own retries and "
                                 "spotguard.client do). false = the engine stops, as without resume: cheaper when "
                                 "clients mostly cancel on purpose.")

    def __post_init__(self) -> None:
        if not 0 < self.ttl <= 86400:
            raise ConfigError(f"[resume] ttl: {self.ttl:g} is not between 0 and 86400 seconds")
        if self.max_bytes < 1 << 20:
            raise ConfigError(f"[resume] max_bytes: {self.max_bytes} is less than 1 MiB ({1 << 20})")
        if self.max_answer_bytes <= 0:
            raise ConfigError(f"[resume] max_answer_bytes: {self.max_answer_bytes} is not a positive number of bytes")
        if not 0 < self.lookup_timeout <= 60:
            raise ConfigError(f"[resume] lookup_timeout: {self.lookup_timeout:g} is not between 0 and 60 seconds")
        if self.advertise:
            from spotguard.resume_names import holder_problem

            why = holder_problem(self.advertise)
            if why:
                raise ConfigError(f"[resume] advertise: {self.advertise!r} {why}")


@dataclass(frozen=True, kw_only=True)
class KubernetesConfig:
    enabled: bool = _opt(False, "Cordon, taint and exclude this node from load balancers on drain.")
    node_name: str = _opt("", "Node name; empty = hostname.")
    api_url: str = _opt("", "API server URL; empty = in-cluster or kubeconfig.")
    kubeconfig: str = _opt("", "Path of a kubeconfig; empty = in-cluster service account.")


@dataclass(frozen=True, kw_only=True)
class Config:
    agent: AgentConfig = field(default_factory=AgentConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    gcp: GcpConfig = field(default_factory=GcpConfig)
    azure: AzureConfig = field(default_factory=AzureConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed (validated like any other source)."""
        return _build({**to_dict(self), section: {**to_dict(self)[section], **values}}, "override")


def sections() -> dict[str, type[Any]]:
    return schema.sections(Config)


def _build(data: Mapping[str, Any], origin: str) -> Config:
    config = schema.build(Config, data, origin)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return schema.to_dict(config)


def load(path: Path | str | None = None, *, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Build the configuration: file, then environment, then CLI overrides.

    ``path`` None means ``$SPOTGUARD_CONFIG``, else the default path only if it exists; a file named by
    ``--config`` or ``$SPOTGUARD_CONFIG`` must exist (a typo must not silently run on defaults).
    """
    env = os.environ if environ is None else environ
    file_data: dict[str, dict[str, Any]] = {}
    origin = "defaults"
    named = env.get("SPOTGUARD_CONFIG") or ""
    via = "--config" if path is not None else "$SPOTGUARD_CONFIG"
    candidate = Path(path) if path is not None else Path(named or DEFAULT_CONFIG_PATH)
    if path is not None or named or candidate.exists():
        raw = schema.read_toml(candidate, via)
        _build(raw, str(candidate))  # validate the file on its own so errors name the file
        file_data = {k: dict(v) for k, v in raw.items()}
        origin = str(candidate)
    env_data = schema.from_env(Config, env, ENV_PREFIX, ENV_NOT_CONFIG)
    _build(env_data, "environment")
    merged = schema.merge(file_data, env_data)
    if overrides:
        merged = schema.merge(merged, overrides)
    return _build(merged, origin if not (env_data or overrides) else f"{origin} + environment/flags")


def reference() -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, help) for every key: the source of the configuration docs."""
    return schema.reference(Config)


def to_toml(config: Config) -> str:
    """The effective configuration as TOML text (``spotguard config show``)."""
    return schema.to_toml(config)
