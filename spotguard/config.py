"""Configuration: one frozen object, built once from file -> environment -> CLI, passed explicitly.

Every key lives in a section dataclass below; its ``help`` metadata is the reference documentation
(``spotguard config show --doc`` and ``docs/operations.md`` are generated from it). A key
``[section] name`` is also settable as the environment variable ``SPOTGUARD_SECTION_NAME``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotguard.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/spotguard/spotguard.toml")
ENV_PREFIX = "SPOTGUARD_"
# Variables under the prefix that are not configuration keys: where the config file is, and the build/test tool
# cache the Makefile exports. Listed so they do not trip the unknown-variable check, which exists to catch typos.
ENV_NOT_CONFIG = frozenset({"SPOTGUARD_CONFIG", "SPOTGUARD_CACHE", "SPOTGUARD_LLAMA_SERVER"})


def _opt(default: Any, help: str, *, choices: tuple[str, ...] = ()) -> Any:
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default=value, metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


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


AZURE_EVENT_TYPES = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")
"""The EventType values Azure Scheduled Events documents."""


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
                                  "requests are handed to them, and requests still running when the snapshot step "
                                  "cuts them are continued there into the same client answer. Empty = refuse new "
                                  "work with 503 and end cut answers with a retryable error.")
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
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed (validated like any other source)."""
        return _build({**to_dict(self), section: {**to_dict(self)[section], **values}}, "override")


def sections() -> dict[str, type[Any]]:
    return {f.name: typing.cast(type[Any], f.type if isinstance(f.type, type) else _hints(Config)[f.name])
            for f in dataclasses.fields(Config)}


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(section: str, key: str, kind: Any, value: Any, origin: str) -> Any:
    where = f"[{section}] {key} (from {origin})"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.strip().lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value, 0) if isinstance(value, str) else int(value) if isinstance(value, int) else _fail()
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value) if isinstance(value, (int, float, str)) else _fail()
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: expected a number of seconds, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where}: not a JSON list: {exc}") from None
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{where}: unsupported type {kind!r}")  # pragma: no cover - a bug in this module


def _fail() -> Any:
    raise TypeError


def _check_choice(section: str, key: str, meta: Mapping[str, Any], value: Any) -> None:
    choices = meta.get("choices", ())
    if choices and value not in choices:
        raise ConfigError(f"[{section}] {key}: {value!r} is not one of {', '.join(choices)}")


def _build(data: Mapping[str, Any], origin: str) -> Config:
    built: dict[str, Any] = {}
    known = sections()
    for name, section_data in data.items():
        if name not in known:
            raise ConfigError(f"unknown section [{name}] (from {origin}); known: {', '.join(known)}")
        if not isinstance(section_data, Mapping):
            raise ConfigError(f"[{name}] must be a table (from {origin})")
        cls = known[name]
        hints = _hints(cls)
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in section_data.items():
            if key not in fields_by_name:
                raise ConfigError(f"unknown key [{name}] {key} (from {origin}); known: {', '.join(fields_by_name)}")
            value = _coerce(name, key, hints[key], raw, origin)
            _check_choice(name, key, fields_by_name[key].metadata, value)
            values[key] = value
        built[name] = cls(**values)
    config = Config(**built)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if config.agent.poll_interval <= 0:
        raise ConfigError("[agent] poll_interval must be > 0 seconds")
    if config.aws.slow_poll_interval <= 0:
        raise ConfigError("[aws] slow_poll_interval must be > 0 seconds")
    if not 1 <= config.aws.token_ttl <= 21600:
        raise ConfigError("[aws] token_ttl must be between 1 and 21600 seconds")
    if config.drain.safety_margin < 0:
        raise ConfigError("[drain] safety_margin must be >= 0")
    _validate_budgets(config)
    if config.gate.allow_paths:
        from spotguard.gate.routes import parse_allow

        parse_allow(config.gate.allow_paths)
    from spotguard.gate.limits import ClientLimits

    ClientLimits.from_config(config.gate)
    for section, key in (("http", "listen"), ("gate", "listen")):
        value = getattr(getattr(config, section), key)
        if value:
            parse_listen(value, f"[{section}] {key}")
    try:
        int(config.control.mode, 8)
    except ValueError:
        raise ConfigError(f"[control] mode: {config.control.mode!r} is not an octal mode like 0660") from None
    known = {name.lower() for name in AZURE_EVENT_TYPES}
    for name in config.azure.drain_event_types:
        if name.strip().lower() not in known:
            raise ConfigError(f"[azure] drain_event_types: {name!r} is not an Azure scheduled event type "
                              f"({', '.join(AZURE_EVENT_TYPES)})")


def _validate_budgets(config: Config) -> None:
    """Budgets that can never fit are errors here; plans that overrun a cloud's window (which depends on
    the cloud the daemon finds itself on) are ``spotguard doctor`` warnings and errors."""
    drain = config.drain
    for key in ("manual_deadline", "wait_inflight_budget", "stop_budget", "deregister_budget", "snapshot_budget",
                "notify_budget"):
        if getattr(drain, key) < 0:
            raise ConfigError(f"[drain] {key} must be >= 0 seconds")
    margin = drain.safety_margin
    if config.shutdown.enabled and config.shutdown.budget <= margin:
        raise ConfigError(f"[shutdown] budget {config.shutdown.budget:g}s is not more than [drain] safety_margin "
                          f"{margin:g}s: a drain after SIGTERM would have no time at all")
    if drain.manual_deadline <= margin:
        raise ConfigError(f"[drain] manual_deadline {drain.manual_deadline:g}s is not more than [drain] "
                          f"safety_margin {margin:g}s: a manual drain would have no time at all")


def parse_listen(value: str, key: str = "listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(Config)}


def _merge(base: dict[str, dict[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {name: dict(values) for name, values in base.items()}
    for name, values in extra.items():
        merged.setdefault(name, {}).update(values)
    return merged


def _from_env(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    known = sections()
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var in ENV_NOT_CONFIG:
            continue
        rest = var[len(ENV_PREFIX):].lower()
        for name in sorted(known, key=len, reverse=True):
            if rest.startswith(name + "_"):
                found.setdefault(name, {})[rest[len(name) + 1:]] = value
                break
        else:
            raise ConfigError(f"unknown environment variable {var}: no section matches; "
                              f"expected SPOTGUARD_<SECTION>_<KEY> with SECTION in {', '.join(known)}")
    return found


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
        try:
            raw = tomllib.loads(candidate.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {candidate} (named by {via}) does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {candidate} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {candidate} cannot be read: {exc}") from None
        _build(raw, str(candidate))  # validate the file on its own so errors name the file
        file_data = {k: dict(v) for k, v in raw.items()}
        origin = str(candidate)
    env_data = _from_env(env)
    _build(env_data, "environment")
    merged = _merge(file_data, env_data)
    if overrides:
        merged = _merge(merged, overrides)
    return _build(merged, origin if not (env_data or overrides) else f"{origin} + environment/flags")


def reference() -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, help) for every key: the source of the configuration docs."""
    rows = []
    for name, cls in sections().items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            type_name = "list of strings" if typing.get_origin(kind) is tuple else getattr(kind, "__name__", str(kind))
            default = f.default if f.default is not dataclasses.MISSING else ""
            shown = json.dumps(list(default)) if isinstance(default, tuple) else json.dumps(default)
            help_text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_text += f" One of: {', '.join(f.metadata['choices'])}."
            rows.append((name, f.name, type_name, shown, help_text))
    return rows


def to_toml(config: Config) -> str:
    """The effective configuration as TOML text (``spotguard config show``)."""
    lines: list[str] = []
    for name, values in to_dict(config).items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)

