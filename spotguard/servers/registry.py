"""Building the configured engine adapter: the one place that knows every engine module."""

from __future__ import annotations

import httpx

from spotguard.config import Config
from spotguard.errors import ConfigError
from spotguard.servers import sglang, tgi, vllm
from spotguard.servers.base import EngineAdapter
from spotguard.servers.command import CommandAdapter
from spotguard.servers.http_hook import HttpHookAdapter
from spotguard.servers.llamacpp import LlamaCppAdapter
from spotguard.servers.none import NoEngine
from spotguard.servers.process import ProcessTarget, Signaller, parse_signal
from spotguard.servers.prom import metrics_url
from spotguard.servers.triton import TritonAdapter, default_metrics_url

SIGNALLED = {"vllm": vllm.build, "sglang": sglang.build, "tgi": tgi.build}


def build_engine(config: Config, http: httpx.AsyncClient) -> EngineAdapter:
    """The adapter for ``[server] kind``; ConfigError naming the key when a setting it needs is missing."""
    server = config.server
    if server.timeout <= 0:
        raise ConfigError("[server] timeout must be > 0 seconds")
    kind = server.kind
    if kind == "none":
        return NoEngine()
    if kind == "command":
        return CommandAdapter(stop_command=server.stop_command, inflight_command=server.inflight_command,
                              timeout=server.timeout)
    if kind == "http":
        return HttpHookAdapter(http=http, stop_url=server.stop_url, stop_method=server.stop_method,
                               stop_body=server.stop_body, inflight_url=server.inflight_url,
                               inflight_json_path=server.inflight_json_path, timeout=server.timeout)
    if kind == "llamacpp":
        if not server.url:
            raise ConfigError("[server] url must be set for kind = llamacpp (llama-server's base URL)")
        return LlamaCppAdapter(http=http, url=server.url, timeout=server.timeout)
    target = ProcessTarget(unit=server.unit, pid_file=server.pid_file, pid=server.pid)
    signaller = Signaller(target=target, signal=parse_signal(server.stop_signal), timeout=server.timeout)
    if kind == "triton":
        if server.triton_models and not server.url:
            raise ConfigError("[server] url must be set to unload [server] triton_models")
        _need_process(kind, target, unless=bool(server.triton_models))
        scrape = server.metrics_url or default_metrics_url(server.url)
        _need_metrics(kind, scrape)
        return TritonAdapter(http=http, url=server.url, metrics_url=scrape, models=server.triton_models,
                             signaller=signaller, timeout=server.timeout)
    if kind in SIGNALLED:
        _need_process(kind, target, unless=False)
        scrape = metrics_url(server.url, server.metrics_url)
        _need_metrics(kind, scrape)
        return SIGNALLED[kind](signaller=signaller, http=http, metrics_url=scrape, timeout=server.timeout)
    raise ConfigError(f"[server] kind: no adapter for {kind!r}")


def _need_process(kind: str, target: ProcessTarget, *, unless: bool) -> None:
    if not target.configured and not unless:
        raise ConfigError(f"kind = {kind} is stopped with a signal: set [server] unit, pid_file or pid "
                          "(spotguard never looks the process up by name)")


def _need_metrics(kind: str, url: str) -> None:
    if not url:
        raise ConfigError(f"kind = {kind} reads in-flight work from its metrics: set [server] url or "
                          "metrics_url")
