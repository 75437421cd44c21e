"""Async client of the emulator's control API (``/_emulator/...``), for tests, the demo and benchmarks."""

from __future__ import annotations

from typing import Any

import httpx

from spotguard.errors import ControlError

DEFAULT_TIMEOUT = 5.0
"""The control API answers at once (it never hangs); 5 s only guards against a wedged emulator."""


class EmulatorControl:
    """Raises and withdraws notices, injects faults, and reads the request log of one emulator.

    Every method raises ``ControlError`` when the emulator cannot be reached or refuses the call
    (the message carries the emulator's own explanation).
    """

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url + "/_emulator", timeout=timeout)

    async def __aenter__(self) -> EmulatorControl:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    params: dict[str, str] | None = None) -> Any:
        try:
            response = await self._client.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise ControlError(f"emulator at {self.base_url}: {method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise ControlError(f"emulator at {self.base_url}: {method} {path}: HTTP {response.status_code}: {detail}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ControlError(f"emulator at {self.base_url}: {method} {path}: answer is not JSON") from exc

    async def raise_notice(self, cloud: str, kind: str, **params: Any) -> str:
        """Make a notice appear on ``cloud``'s metadata; returns its event id (for change/withdraw)."""
        answer = await self._call("POST", "/notices", {"cloud": cloud, "kind": kind, **params})
        return str(answer["event_id"])

    async def change(self, cloud: str, event_id: str, **fields: Any) -> None:
        """Change fields of a raised notice (e.g. scheduled ``state="canceled"``, Azure ``status="Started"``)."""
        await self._call("PATCH", f"/notices/{cloud}/{event_id}", dict(fields))

    async def withdraw(self, cloud: str, event_id: str) -> None:
        """Take a notice back, as if the cloud changed its mind."""
        await self._call("DELETE", f"/notices/{cloud}/{event_id}")

    async def notices(self) -> dict[str, Any]:
        """What every cloud currently shows (for debugging tests)."""
        return dict(await self._call("GET", "/notices"))

    async def fault(self, path: str, **params: Any) -> str:
        """Inject a fault on metadata paths starting with ``path``; returns the fault id.

        params: status, latency, body, content_type, drop, expire_tokens, count, duration.
        """
        answer = await self._call("POST", "/faults", {"path": path, **params})
        return str(answer["fault_id"])

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/faults")

    async def configure(self, **fields: Any) -> None:
        """Change emulator settings at run time (e.g. ``require_v2=False`` to allow IMDSv1)."""
        await self._call("PATCH", "/config", dict(fields))

    async def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """The metadata requests seen so far (oldest first), optionally only those under ``path``."""
        answer = await self._call("GET", "/requests", params={"path": path} if path else None)
        return list(answer["requests"])

    async def reset(self) -> None:
        """Back to a fresh instance: no notices, no faults, no tokens, empty request log."""
        await self._call("POST", "/reset")
