"""The configuration's rules that tie keys together or constrain their values (``config.validate``), and the
parsers of keys whose values have a syntax of their own (``[http] listen``, ``[gate] allow_paths``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from spotguard.errors import ConfigError

if TYPE_CHECKING:
    from spotguard.config import Config, GateConfig

AZURE_EVENT_TYPES = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")
"""The EventType values Azure Scheduled Events documents."""


def _validate_gate_limits(gate: GateConfig) -> None:
    """The client limits (``gate/limits.py``) that cannot work."""
    for key in ("head_timeout", "body_timeout", "keepalive_timeout"):
        if not getattr(gate, key) > 0:
            raise ConfigError(f"[gate] {key} must be > 0 seconds")
    for key in ("max_connections", "max_headers", "max_head", "read_ahead", "max_body"):
        if getattr(gate, key) < 1:
            raise ConfigError(f"[gate] {key} must be at least 1")
    if gate.body_memory < gate.max_body:
        raise ConfigError(f"[gate] body_memory ({gate.body_memory}) must be at least [gate] max_body "
                          f"({gate.max_body}): one body of the largest size must fit")


def validate(config: Config) -> None:
    """Values that cannot work, and keys that contradict each other: ConfigError naming the key."""
    if config.agent.poll_interval <= 0:
        raise ConfigError("[agent] poll_interval must be > 0 seconds")
    if config.aws.slow_poll_interval <= 0:
        raise ConfigError("[aws] slow_poll_interval must be > 0 seconds")
    if not 1 <= config.aws.token_ttl <= 21600:
        raise ConfigError("[aws] token_ttl must be between 1 and 21600 seconds")
    if config.drain.safety_margin < 0:
        raise ConfigError("[drain] safety_margin must be >= 0")
    _validate_budgets(config)
    parse_allow(config.gate.allow_paths)
    _validate_gate_limits(config.gate)
    for key, urls in (("[gate] upstream", (config.gate.upstream,)), ("[gate] peers", config.gate.peers)):
        if any("@" in urlsplit(url).netloc for url in urls if url):
            # Not echoed: the value holds a secret. The gate would not use it (it forwards the client's own
            # Authorization), and it would be in every log line that names the URL.
            raise ConfigError(f"{key}: a URL with credentials in it (user:password@host); remove them")
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


_ALLOW_ENTRY = re.compile(r"(?:([A-Z]{3,10})\s+)?(/[A-Za-z0-9._~!$&'()+,;=:@/-]*?)?(/\*)?")


def parse_allow(entries: tuple[str, ...]) -> tuple[tuple[frozenset[str], str], ...]:
    """``[gate] allow_paths`` entries as (methods, pattern), an empty method set meaning any method;
    ConfigError naming a bad one. The gate's path policy (``gate/routes.py``) is built from them."""
    parsed = []
    for entry in entries:
        found = _ALLOW_ENTRY.fullmatch(entry.strip())
        path = (found.group(2) or "") if found else ""
        if not found or not (path or found.group(3)) or "//" in path or any(s in (".", "..") for s in path.split("/")) or (
                path.endswith("/") and path != "/"):
            raise ConfigError(f"[gate] allow_paths: {entry!r} is not \"/path\", \"/prefix/*\" or \"METHOD /path\" "
                              f"(a normalised path, no escapes)")
        method = found.group(1)
        parsed.append((frozenset({method}) if method else frozenset[str](), path + (found.group(3) or "")))
    return tuple(parsed)
