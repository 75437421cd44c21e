"""``spotguard doctor``: what an operator checks before trusting the node to drain in time."""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx

from spotguard import gpu, preflight
from spotguard.checks import Check
from spotguard.clouds.detect import detect_cloud
from spotguard.clouds.registry import cloud_identity, cloud_sources
from spotguard.config import Config
from spotguard.preflight import UNIT_DIRS

WINDOWS = {"aws": 120.0, "gcp": 30.0, "azure": 30.0, "none": 30.0}
"""The shortest notice each cloud gives for a spot eviction (seconds; see docs/operations.md)."""


def budget_check(config: Config, cloud: str) -> Check:
    """Does the drain plan fit the cloud's shortest window, given the configured budgets?"""
    window = config.shutdown.budget if cloud == "none" else WINDOWS.get(cloud, 30.0)
    if cloud == "gcp":
        window = min(window, config.gcp.window)
    d = config.drain
    # stop and deregister run side by side; wait_inflight follows stop, snapshot follows wait_inflight.
    critical = max(d.stop_budget + d.wait_inflight_budget + d.snapshot_budget, d.deregister_budget)
    usable = window - d.safety_margin
    if usable <= 0:
        return Check("drain budget", "error", f"[drain] safety_margin {d.safety_margin:g}s leaves nothing of "
                     f"the {window:g}s {cloud} window")
    if critical > usable:
        return Check("drain budget", "warning",
                     f"step budgets add up to {critical:g}s on the longest path but the {cloud} window leaves "
                     f"{usable:g}s after the safety margin: later steps (snapshot) get what is left; lower "
                     f"[drain] wait_inflight_budget to keep time for snapshots")
    return Check("drain budget", "ok", f"longest path {critical:g}s fits the {usable:g}s usable of {window:g}s")


def path_check(name: str, path: Path, *, want_dir: bool, max_mode: int) -> Check:
    try:
        info = path.stat()
    except FileNotFoundError:
        parent = path.parent
        if os.access(parent if parent.exists() else Path("/"), os.W_OK):
            return Check(name, "ok", f"{path} will be created")
        return Check(name, "error", f"{path} does not exist and {parent} is not writable")
    except OSError as exc:
        return Check(name, "error", f"{path}: {exc}")
    mode = stat.S_IMODE(info.st_mode)
    if want_dir and not stat.S_ISDIR(info.st_mode):
        return Check(name, "error", f"{path} is not a directory")
    if mode & ~max_mode:
        return Check(name, "warning", f"{path} has mode {mode:04o}; expected at most {max_mode:04o}")
    return Check(name, "ok", f"{path} mode {mode:04o}")


def unit_order_check(config: Config, unit_dirs: tuple[Path, ...] = UNIT_DIRS) -> Check:
    """spotguard must stop (and drain) before the engine: systemd stops units in reverse start order."""
    units = [d / "spotguard.service" for d in unit_dirs if (d / "spotguard.service").exists()]
    if not units:
        return Check("unit ordering", "warning", "spotguard.service is not installed (packer/scripts/install-spotguard.sh)")
    engine = config.server.unit
    if not engine:
        return Check("unit ordering", "warning", "[server] unit is not set: cannot check that spotguard stops "
                     "before the inference server on OS shutdown")
    texts = [u.read_text(errors="replace") for u in units]
    texts += [c.read_text(errors="replace") for d in unit_dirs
              for c in sorted((d / "spotguard.service.d").glob("*.conf")) if (d / "spotguard.service.d").is_dir()]
    after = {word for text in texts for line in text.splitlines() if line.strip().startswith("After=")
             for word in line.split("=", 1)[1].split()}
    if engine in after:
        return Check("unit ordering", "ok", f"spotguard.service is ordered After={engine}: it drains before "
                     f"{engine} is stopped")
    return Check("unit ordering", "error", f"spotguard.service is not ordered After={engine}: on shutdown systemd "
                 f"may stop the engine first; install the drop-in (install-spotguard.sh --inference-unit {engine})")


async def _timed(name: str, probe: Callable[[], Awaitable[str]], timeout: float) -> Check:
    try:
        with anyio.fail_after(timeout):
            return Check(name, "ok", await probe())
    except TimeoutError:
        return Check(name, "error", f"no answer within {timeout:g}s")
    except Exception as exc:  # doctor reports every failure instead of stopping at the first
        return Check(name, "error", f"{type(exc).__name__}: {exc}")


async def run_checks(config: Config) -> list[Check]:
    checks: list[Check] = [Check("configuration", "ok", "loaded and valid")]
    async with httpx.AsyncClient(trust_env=False) as http:
        cloud = await detect_cloud(config, http)
        checks.append(Check("cloud", "ok" if cloud != "none" else "warning",
                            cloud if cloud != "none" else "no cloud detected: only OS shutdown and manual drains"))
        if cloud != "none":
            checks.append(await _timed("metadata", lambda: _probe_sources(config, http, cloud),
                                       config.agent.request_timeout * 3))
        if config.server.kind != "none":
            checks.append(await _timed("engine", lambda: _probe_engine(config, http), 5.0))
        if config.aws.target_group_arns or config.aws.lifecycle_hook or config.gcp.instance_groups \
                or config.gcp.network_endpoint_groups or config.azure.backend_pools:
            identity = await cloud_identity(cloud, config, http, _Quiet())
            checks += await preflight.balancer_checks(config, http, identity)
    report = await anyio.to_thread.run_sync(gpu.read_gpus)
    checks.append(Check("nvml", "ok" if report.ok else "warning",
                        f"{report.count} GPU(s), driver {report.driver}" if report.ok else report.error))
    checks.append(budget_check(config, cloud))
    checks.append(unit_order_check(config))
    checks.append(preflight.stop_timeout_check(config))
    checks += [c for c in (preflight.gate_port_check(config), preflight.peers_check(config),
                           preflight.resume_check(config)) if c is not None]
    checks.append(path_check("state dir", Path(config.agent.state_dir), want_dir=True, max_mode=0o755))
    checks.append(path_check("control socket", Path(config.control.socket), want_dir=False,
                             max_mode=int(config.control.mode, 8)))
    if config.gate.listen:
        checks.append(await gate_check(config))
    return checks


class _Quiet:
    """A logger for the daemon's helpers that doctor calls: their fallbacks show up in the checks instead."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


async def gate_check(config: Config) -> Check:
    """Is the gate process running for this configuration, and is its control socket private?"""
    from spotguard.errors import GateError
    from spotguard.gate.control import SOCKET_MODE, call, control_path

    path = control_path(config)
    try:
        hello = await call(path, "hello", timeout=2.0)
    except GateError as exc:
        if config.gate.start == "auto":
            return Check("gate", "warning", f"no gate process answers on {path} ({exc}); `spotguard run` starts "
                         "one ([gate] start = auto)")
        return Check("gate", "error", f"no gate process answers on {path} ({exc}) and [gate] start = external: "
                     "start spotguard-gate.service (systemctl enable --now spotguard-gate)")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & ~SOCKET_MODE:
        return Check("gate", "warning", f"gate pid {hello.get('pid')} answers, but {path} has mode {mode:04o}; "
                     f"expected {SOCKET_MODE:04o}")
    if (hello.get("listen"), hello.get("upstream")) != (config.gate.listen, config.gate.upstream):
        return Check("gate", "warning", f"gate pid {hello.get('pid')} runs with listen={hello.get('listen')} "
                     f"upstream={hello.get('upstream')}, not this configuration's; `spotguard gate --stop` "
                     "once it is idle, then start it again")
    return Check("gate", "ok", f"gate pid {hello.get('pid')} (spotguard {hello.get('version')}) on "
                 f"{hello.get('listen')} -> {hello.get('upstream')}, {hello.get('inflight')} in flight, "
                 f"{'draining' if hello.get('draining') else 'accepting'}")


async def _probe_sources(config: Config, http: httpx.AsyncClient, cloud: str) -> str:
    sources = cloud_sources(cloud, config, http)
    names = []
    for source in sources:
        if source.hanging:
            names.append(f"{source.name} (hanging GET, not probed)")
            continue
        notices = await source.poll()
        names.append(f"{source.name}: {len(notices)} notice(s)")
    return "; ".join(names)


async def _probe_engine(config: Config, http: httpx.AsyncClient) -> str:
    from spotguard.servers.registry import build_engine

    engine = build_engine(config, http)
    count = await engine.inflight()
    return f"{config.server.kind}: {'unknown' if count is None else count} request(s) in flight"
