"""``spotguard gate``: the gate as its own process, the data plane that outlives the daemon.

Lifecycle, like the daemon's: capture signals -> listen (control socket first, so a daemon that
finds the port taken can also find out by whom) -> serve -> on SIGTERM/SIGINT or the control
socket's ``stop``: refuse new requests (503 + Retry-After), wait up to ``[gate] stop_timeout`` for
the requests in flight, then close what is left. A second signal forces exit at once.

It runs in its own session (the daemon starts it with ``start_new_session``, systemd in its own unit),
so a daemon that crashes, is killed or restarted never takes a request in flight with it.
"""

from __future__ import annotations

import signal

import anyio

from spotguard import __version__, logs, sdnotify
from spotguard.config import Config
from spotguard.errors import GateError
from spotguard.gate.control import GateControl, control_path, listen_unix, serve_control
from spotguard.gate.holding import Holding
from spotguard.gate.limits import raise_fd_limit
from spotguard.gate.listen import listen_socket, run_gate
from spotguard.gate.proxy import Gate
from spotguard.metrics import Metrics
from spotguard.netloc import cleartext_peers

STOP_POLL = 0.05
"""Seconds between checks of the requests left while stopping."""


async def run_gate_process(config: Config) -> int:
    """Serve until a signal or ``stop``; returns the exit code."""
    log = logs.get("gate")
    metrics = Metrics()
    holding = Holding.from_config(config, metrics, log)
    fds_before, fds = raise_fd_limit()  # before the limits are fitted to it (from_config)
    gate = Gate.from_config(config.gate, metrics=metrics, log=log, instance_id=config.agent.instance_id,
                            engine_kind=config.server.kind, holding=holding)
    log.info("gate_fd_limit", before=fds_before, now=fds, max_connections=gate.connections.limits.max_connections)
    for url in cleartext_peers(config.gate.peers):
        log.warning("gate_peer_cleartext", peer=url, why="plain http to another machine: prompts, answers and "
                    "Authorization headers cross the network in clear; use https")
    path = control_path(config)
    # Both sockets before anything runs: a gate already running (or the port taken) is a plain error.
    control_sock = listen_unix(path)
    try:
        data_sock = listen_socket(config.gate.listen)
    except GateError:
        control_sock.close()
        raise
    stop = anyio.Event()
    exit_code = 0
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            control = GateControl(gate, listen=config.gate.listen, upstream=config.gate.upstream,
                                  stop=stop.set, log=log)
            await tg.start(serve_control, control, path, control_sock, name="gate-control")
            bound = await tg.start(run_gate, gate, config.gate.listen, data_sock, name="gate-listener")
            log.info("gate_started", version=__version__, listen=bound.url, upstream=config.gate.upstream,
                     resume=holding.holder if holding is not None else "off",
                     index=bool(holding is not None and holding.index is not None),
                     control=path)
            sdnotify.notify("READY=1", f"STATUS=gate on {bound.url}")

            async def on_signals() -> None:
                nonlocal exit_code
                async for signum in signals:
                    if stop.is_set():
                        log.warning("gate_forced_exit", signal=signal.Signals(signum).name)
                        exit_code = 1
                        tg.cancel_scope.cancel()
                        return
                    log.info("gate_stopping", signal=signal.Signals(signum).name, inflight=gate.active)
                    stop.set()

            tg.start_soon(on_signals, name="gate-signals")
            await stop.wait()
            sdnotify.notify("STOPPING=1")
            gate.set_draining(True)
            gate.stop_listening()
            with anyio.move_on_after(config.gate.stop_timeout) as waited:
                while gate.active or gate.background:  # index writes of the last cuts included
                    await anyio.sleep(STOP_POLL)
            if waited.cancelled_caught:
                log.warning("gate_stop_timeout", left=gate.active, background=gate.background, timeout=config.gate.stop_timeout)
            tg.cancel_scope.cancel()
    log.info("gate_stopped", exit_code=exit_code)
    return exit_code
