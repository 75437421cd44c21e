"""``doctor``'s checks of the settings that break evictions in practice, outside spotguard's own config.

Each looks at one place where a drain that works in a rehearsal fails on a real eviction: systemd
killing the daemon before its shutdown drain ends, a load balancer that sends traffic past the gate,
a gate with nowhere to move requests, a target group that keeps draining after the VM is gone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx

from spotguard.checks import Check
from spotguard.clouds.identity import Identity
from spotguard.config import Config, parse_listen
from spotguard.errors import SpotguardError
from spotguard.netloc import is_loopback

UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))
"""Where installed systemd units live, in the order systemd looks."""
SYSTEMD_DEFAULT_STOP = 90.0
"""systemd's DefaultTimeoutStopSec when neither the unit nor system.conf sets one."""
EXIT_HEADROOM = 5.0
"""Seconds the daemon needs after its drain to report and exit before systemd's SIGKILL."""

_SPAN_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1.0, "s": 1.0, "sec": 1.0,
               "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
               "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0,
               "days": 86400.0, "w": 604800.0, "week": 604800.0, "weeks": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SPAN = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*[A-Za-z]*)+\s*")


def parse_timespan(text: str) -> float | None:
    """A systemd time span ("40", "40s", "1min 30s", "infinity") in seconds; None for infinity.

    Raises ValueError for text systemd would not accept either.
    """
    value = text.strip()
    if value == "infinity":
        return None
    if not _SPAN.fullmatch(value):
        raise ValueError(f"not a systemd time span: {text!r}")
    total = 0.0
    for number, unit in _PART.findall(value):
        if unit not in _SPAN_UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {text!r}")
        total += float(number) * _SPAN_UNITS[unit]
    return total


def _unit_texts(unit_dirs: Sequence[Path], name: str) -> list[tuple[Path, str]]:
    """The unit and its drop-ins in the order systemd applies them (the first directory wins a name)."""
    unit = next((d / name for d in unit_dirs if (d / name).is_file()), None)
    if unit is None:
        return []
    dropins: dict[str, Path] = {}
    for directory in unit_dirs:
        folder = directory / f"{name}.d"
        if folder.is_dir():
            for conf in folder.glob("*.conf"):
                dropins.setdefault(conf.name, conf)
    paths = [unit, *(dropins[key] for key in sorted(dropins))]
    return [(path, path.read_text(errors="replace")) for path in paths]


def stop_timeout_check(config: Config, unit_dirs: Sequence[Path] = UNIT_DIRS) -> Check:
    """systemd must let the shutdown drain finish: TimeoutStopSec above ``[shutdown] budget``."""
    name = "stop timeout"
    texts = _unit_texts(unit_dirs, "spotguard.service")
    if not texts:
        return Check(name, "warning", "spotguard.service is not installed: cannot compare its TimeoutStopSec "
                     f"with [shutdown] budget {config.shutdown.budget:g}s")
    timeout: float | None = SYSTEMD_DEFAULT_STOP
    where = f"systemd's default {SYSTEMD_DEFAULT_STOP:g}s"
    for path, text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, sep, value = line.partition("=")
            if section != "Service" or not sep or key.strip() not in ("TimeoutStopSec", "TimeoutSec"):
                continue
            if not value.strip():  # an empty assignment resets to the default
                timeout, where = SYSTEMD_DEFAULT_STOP, f"systemd's default {SYSTEMD_DEFAULT_STOP:g}s ({path})"
                continue
            try:
                timeout = parse_timespan(value)
            except ValueError as exc:
                return Check(name, "error", f"{path}: {key.strip()}={value.strip()}: {exc}")
            where = f"{key.strip()}={value.strip()} in {path}"
    if not config.shutdown.enabled:
        return Check(name, "ok", f"{where}; [shutdown] enabled = false, so SIGTERM does not drain")
    budget = config.shutdown.budget
    if timeout is None:
        return Check(name, "ok", f"{where}: systemd never kills the drain")
    if timeout <= budget:
        return Check(name, "error", f"{where} is not above [shutdown] budget {budget:g}s: systemd kills spotguard "
                     f"(SIGKILL) before its shutdown drain ends; raise TimeoutStopSec in a drop-in "
                     f"(systemctl edit spotguard.service) to at least {budget + EXIT_HEADROOM:g}s")
    if timeout < budget + EXIT_HEADROOM:
        return Check(name, "warning", f"{where} leaves {timeout - budget:g}s after [shutdown] budget {budget:g}s "
                     f"for spotguard to exit; give it {EXIT_HEADROOM:g}s or more")
    return Check(name, "ok", f"{where} is above [shutdown] budget {budget:g}s")


def _port(url: str) -> int | None:
    try:
        parts = urlsplit(url)
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None


def gate_port_check(config: Config) -> Check | None:
    """With the gate on, the load balancer must send traffic to the gate, not to the engine behind it.

    None when the gate is off. The ports come from ``[aws] target_port`` and ``[gcp] neg_port``;
    Azure's backend pools carry no port (the load-balancing rule has it), so that is only a reminder.
    """
    if not config.gate.listen:
        return None
    name = "gate in front"
    _, gate_port = parse_listen(config.gate.listen, "[gate] listen")
    engine_port = _port(config.gate.upstream) if config.gate.upstream else None
    server_port = _port(config.server.url) if config.server.url else None
    if engine_port is None:
        return Check(name, "error", "[gate] listen is set but [gate] upstream is empty: the gate has no engine to "
                     "pass requests to")
    if server_port is not None and server_port != engine_port:
        return Check(name, "warning", f"[gate] upstream is port {engine_port} but [server] url is port {server_port}: "
                     f"the gate is not in front of the engine spotguard stops and counts")
    targets = []
    if config.aws.target_group_arns:
        targets.append(("[aws] target_port", config.aws.target_port))
    if config.gcp.network_endpoint_groups:
        targets.append(("[gcp] neg_port", config.gcp.neg_port))
    problems, unknown = [], []
    for setting, port in targets:
        if not port:
            unknown.append(setting)
        elif port == engine_port:
            problems.append(f"{setting} = {port} is the engine's port: the load balancer sends requests past the "
                            f"gate (port {gate_port}), so a draining node keeps getting new work and the requests "
                            f"in flight are not journaled; register port {gate_port} and set {setting} = {gate_port}")
        elif port != gate_port:
            problems.append(f"{setting} = {port} is neither the gate's port {gate_port} nor the engine's "
                            f"{engine_port}: check which port the load balancer sends requests to")
    if problems:
        return Check(name, "error" if any("past the gate" in p for p in problems) else "warning", "; ".join(problems))
    if unknown:
        return Check(name, "warning", f"{' and '.join(unknown)} = 0 (the pool's own port): cannot tell whether the "
                     f"load balancer sends requests to the gate (port {gate_port}) or past it to the engine "
                     f"({engine_port}); set it to {gate_port}")
    reminder = (f"; Azure backend pools carry no port: the load-balancing rule's backend port must be {gate_port}"
                if config.azure.backend_pools else "")
    if not targets:
        return Check(name, "ok", f"gate on port {gate_port} in front of the engine on {engine_port}{reminder}")
    return Check(name, "ok", f"the load balancer targets the gate (port {gate_port}), not the engine "
                 f"({engine_port}){reminder}")


def peers_check(config: Config) -> Check | None:
    """With the gate on, a peer to move unfinished requests to. None when the gate is off."""
    if not config.gate.listen:
        return None
    peers = config.gate.peers
    if not peers:
        return Check("gate peers", "warning", "[gate] peers is empty: requests still running when the window "
                     "closes can only be snapshotted, not moved to another replica; list the other replicas' gates")
    from spotguard.netloc import cleartext_peers

    clear = cleartext_peers(peers)
    if clear:
        return Check("gate peers", "warning", f"{', '.join(clear)}: plain http to another machine: prompts, answers "
                     "and the clients' Authorization headers cross the network in clear; use https:// peers "
                     "(a private CA goes in SSL_CERT_FILE of the gate's environment)")
    return Check("gate peers", "ok", f"{len(peers)} peer(s) to move unfinished requests to")


async def balancer_checks(config: Config, http: httpx.AsyncClient, identity: Identity, *,
                          timeout: float = 15.0) -> list[Check]:
    """Each configured load balancer's own setup check (AWS: a deregistration delay longer than the notice)."""
    from spotguard.lb.base import Checkable
    from spotguard.lb.build import build_balancers

    try:
        balancers = build_balancers(config, http, identity)
    except SpotguardError as exc:
        return [Check("load balancers", "error", str(exc))]
    checks = []
    for balancer in balancers:
        if not isinstance(balancer, Checkable):
            continue
        name = f"{balancer.name} load balancer"
        try:
            with anyio.fail_after(timeout):
                warnings = await balancer.check(budget=timeout)
        except TimeoutError:
            checks.append(Check(name, "warning", f"its check did not answer within {timeout:g}s"))
            continue
        checks.append(Check(name, "warning", "; ".join(warnings)) if warnings
                      else Check(name, "ok", "settings fit the notice window"))
    return checks


def resume_check(config: Config) -> Check | None:
    """With the gate on: is resume on, is its key private, can other gates reach answers held here, and can a
    retry find an answer whose holder is gone. None when the gate is off."""
    if not config.gate.listen:
        return None
    from spotguard.gate.cursor import CursorKey, advertised_holder

    resume = config.resume
    if not resume.key_file:
        return Check("resume", "warning", "off ([resume] key_file is empty): an answer cut at an eviction ends with "
                     "a retryable error and its retry is computed again; put the same 32-byte key file on every "
                     "node to let clients resume (head -c 32 /dev/urandom > FILE)")
    try:
        key = CursorKey.load(resume.key_file)
        mode = Path(resume.key_file).stat().st_mode & 0o777
    except (SpotguardError, OSError) as exc:
        return Check("resume", "error", str(exc))
    problems = []
    if mode & 0o077:
        problems.append(f"{resume.key_file} has mode {mode:04o}: anyone who reads it can forge cursors; chmod 600")
    holder = advertised_holder(resume.advertise, config.gate.listen)
    where = holder or "the VM's private IP from its metadata"
    if is_loopback(holder):
        problems.append(f"answers held here are named {holder}, which other gates cannot reach; set "
                        "[resume] advertise or listen on the private address")
    if resume.index and not config.snapshot.url:
        problems.append("[resume] index needs [snapshot] url: a retry whose holder is gone is computed again")
    if problems:
        return Check("resume", "warning", "; ".join(problems))
    index = f"index in {config.snapshot.url}" if resume.index else "no index ([resume] index = false)"
    return Check("resume", "ok", f"on: key {key.key_id}, ttl {resume.ttl:g}s, held answers named {where}, {index}")
