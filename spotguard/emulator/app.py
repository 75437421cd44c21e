"""The emulator as one ASGI app: AWS, GCP and Azure metadata on their real paths, plus /_emulator/.

Metadata requests go through the fault queue, then to the cloud whose path prefix matches; every one
is logged (bounded) so tests can check what a client actually sent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from spotguard.asgi import Bound, Receive, Scope, Send, query_params, read_body, respond, serve, tcp_socket
from spotguard.emulator.aws import AwsMetadata
from spotguard.emulator.azure import AzureMetadata
from spotguard.emulator.faults import Fault, FaultQueue
from spotguard.emulator.gcp import GcpMetadata
from spotguard.emulator.instance import EmulatedInstance
from spotguard.emulator.wire import BadRequest, CloudMetadata, Params, Reply, Request, UnknownNotice
from spotguard.errors import ConfigError
from spotguard.notice import rfc3339, utcnow

CONTROL = "/_emulator"
LOG_LIMIT = 10_000
"""Requests kept in the log; older ones fall off so a long rehearsal cannot exhaust memory."""


class EmulatorApp:
    """One emulated VM; all state lives in this object (reset() rebuilds it)."""

    def __init__(self, instance: EmulatedInstance | None = None, *, require_v2: bool = True) -> None:
        self.instance = instance or EmulatedInstance()
        self._require_v2_default = require_v2
        self.faults = FaultQueue()
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LIMIT)
        self._closing: anyio.Event | None = None
        self._closed = False
        self._logger = structlog.get_logger("spotguard.emulator")
        self._build()

    def _build(self) -> None:
        self.aws = AwsMetadata(self.instance, require_v2=self._require_v2_default)
        self.gcp = GcpMetadata(self.instance)
        self.azure = AzureMetadata(self.instance)
        self.clouds: dict[str, CloudMetadata] = {c.name: c for c in (self.aws, self.gcp, self.azure)}

    def reset(self) -> None:
        for cloud in self.clouds.values():
            cloud.close()  # hanging GETs on the old state answer now rather than never
        self._build()
        self.faults.clear()
        self.log.clear()

    def close(self) -> None:
        """Wake everything that waits (hanging GETs, latency faults) so the server stops at once."""
        self._closed = True
        if self._closing is not None:
            self._closing.set()
        for cloud in self.clouds.values():
            cloud.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = str(scope["path"])
        if path == CONTROL or path.startswith(CONTROL + "/"):
            await self._control(scope, receive, send)
        else:
            await self._metadata(scope, receive, send)

    # -- metadata ------------------------------------------------------------------------------

    async def _metadata(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(receive, limit=64 * 1024)
        except ValueError:
            await respond(send, 413, "request body too large")
            return
        request = Request(str(scope["method"]), str(scope["path"]), query_params(scope),
                          {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
                           for k, v in scope.get("headers", [])}, body)
        fault = self.faults.take(request.path)
        entry: dict[str, Any] = {
            "method": request.method, "path": request.path,
            "query": bytes(scope.get("query_string", b"")).decode("latin-1"), "params": dict(request.query),
            "headers": dict(request.headers), "body": body.decode("utf-8", errors="replace"),
            "time": rfc3339(utcnow()), "timestamp": time.time(), "status": None,
            "fault_id": fault.fault_id if fault else None,
        }
        self.log.append(entry)
        async with anyio.create_task_group() as tg:
            # a client that hangs up (e.g. gives up on a hanging GET) frees its handler at once
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            entry["status"] = await self._answer(request, fault, send)
            tg.cancel_scope.cancel()

    async def _answer(self, request: Request, fault: Fault | None, send: Send) -> int:
        if fault is not None:
            if fault.latency:
                with anyio.move_on_after(fault.latency):
                    await self._closing_event().wait()
            if fault.expire_tokens:
                for cloud in self.clouds.values():
                    cloud.expire_tokens()
            if fault.drop:
                await _drop(send)
                return 0
            if fault.status is not None:
                await respond(send, fault.status, fault.body, content_type=fault.content_type)
                return fault.status
        target = next((c for c in self.clouds.values() if request.path.startswith(c.prefix)), None)
        reply = Reply(404, "not found") if target is None else await target.handle(request)
        await respond(send, reply.status, reply.body, content_type=reply.content_type,
                      headers=[(k.encode(), v.encode()) for k, v in reply.headers])
        return reply.status

    def _closing_event(self) -> anyio.Event:
        if self._closing is None:
            self._closing = anyio.Event()
            if self._closed:
                self._closing.set()
        return self._closing

    # -- control API ---------------------------------------------------------------------------

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope["method"])
        parts = str(scope["path"]).removeprefix(CONTROL).strip("/").split("/")
        try:
            raw = await read_body(receive)
            data = json.loads(raw) if raw.strip() else {}
            if not isinstance(data, dict):
                raise BadRequest("the body must be a JSON object")
            status, answer = self._route(method, parts, data, query_params(scope))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            status, answer = 400, {"error": f"the body is not JSON: {exc}"}
        except ValueError as exc:  # BadRequest, or a body over read_body's limit
            status, answer = 400, {"error": str(exc)}
        except UnknownNotice as exc:
            status, answer = 404, {"error": str(exc)}
        if status >= 400:
            self._logger.warning("emulator control call refused", method=method, path=scope["path"],
                                 status=status, error=answer.get("error"))
        await respond(send, status, json.dumps(answer), content_type="application/json")

    def _route(self, method: str, parts: list[str], data: dict[str, Any],
               query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        match method, parts:
            case "POST", ["notices"]:
                cloud, kind = self._cloud(data.pop("cloud", None)), data.pop("kind", None)
                if not isinstance(kind, str):
                    raise BadRequest("notice: 'kind' is required")
                event_id = cloud.raise_notice(kind, Params(data, f"{cloud.name} {kind}"))
                self._logger.info("emulator notice raised", cloud=cloud.name, kind=kind, event_id=event_id)
                return 200, {"event_id": event_id}
            case "GET", ["notices"]:
                return 200, {name: cloud.state() for name, cloud in self.clouds.items()}
            case "PATCH", ["notices", cloud_name, event_id]:
                self._cloud(cloud_name).change(event_id, Params(data, f"{cloud_name} {event_id}"))
                return 200, {"event_id": event_id}
            case "DELETE", ["notices", cloud_name, event_id]:
                self._cloud(cloud_name).withdraw(event_id)
                self._logger.info("emulator notice withdrawn", cloud=cloud_name, event_id=event_id)
                return 200, {"event_id": event_id}
            case "POST", ["faults"]:
                return 200, {"fault_id": self.faults.add(data).fault_id}
            case "GET", ["faults"]:
                return 200, {"faults": self.faults.listing()}
            case "DELETE", ["faults"]:
                self.faults.clear()
                return 200, {}
            case "DELETE", ["faults", fault_id]:
                if not self.faults.remove(fault_id):
                    raise UnknownNotice(f"no fault with id {fault_id}")
                return 200, {}
            case "GET", ["requests"]:
                prefix = query.get("path", "")
                return 200, {"requests": [dict(e) for e in self.log if str(e["path"]).startswith(prefix)]}
            case "DELETE", ["requests"]:
                self.log.clear()
                return 200, {}
            case "POST", ["reset"]:
                self.reset()
                return 200, {}
            case "GET", ["config"]:
                return 200, {"require_v2": self.aws.require_v2, "instance": dataclasses.asdict(self.instance)}
            case "PATCH", ["config"]:
                params = Params(data, "config")
                require_v2 = params.flag("require_v2", self.aws.require_v2)
                params.done()
                self.aws.require_v2 = require_v2
                return 200, {"require_v2": require_v2}
        known = ("notices", "faults", "requests", "reset", "config")
        if parts and parts[0] in known:
            return 405, {"error": f"{method} is not allowed on {CONTROL}/{'/'.join(parts)}"}
        return 404, {"error": f"no control endpoint {CONTROL}/{'/'.join(parts)}; "
                              f"see {', '.join(CONTROL + '/' + k for k in known)}"}

    def _cloud(self, name: object) -> CloudMetadata:
        if not isinstance(name, str) or name not in self.clouds:
            raise BadRequest(f"'cloud' must be one of {', '.join(self.clouds)}, got {name!r}")
        return self.clouds[name]


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _drop(send: Send) -> None:
    """Promise a body, send part of it, and return: uvicorn then closes the connection mid-response."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"4096")]})
    await send({"type": "http.response.body", "body": b"partial", "more_body": True})


async def run_emulator(host: str = "127.0.0.1", port: int = 8169, app: EmulatorApp | None = None, *,
                       require_v2: bool = True, instance: EmulatedInstance | None = None,
                       task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the emulator on host:port until cancelled; reports the bound address (port 0 = any free).

    ``app`` serves an existing emulator (tests keep a handle on it); otherwise a new one is built
    from ``instance`` and ``require_v2`` (False also answers IMDSv1 requests without a token).
    """
    served = app if app is not None else EmulatorApp(instance, require_v2=require_v2)
    logger = structlog.get_logger("spotguard.emulator")
    try:
        sock = tcp_socket(host, port)
    except OSError as exc:
        raise ConfigError(f"emulator cannot listen on {host}:{port} (--listen): {exc.strerror or exc}") from exc
    try:
        async with anyio.create_task_group() as tg:
            bound: Bound = await tg.start(serve, served, sock)
            logger.info("metadata emulator listening", url=bound.url, require_v2=served.aws.require_v2,
                        control=bound.url + CONTROL)
            task_status.started(bound)
    finally:
        served.close()
        sock.close()  # serve() leaves the listening socket to its owner
