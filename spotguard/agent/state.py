"""The node's drain state, persisted atomically so a restarted daemon on a draining node stays draining.

Writes happen off the event loop (``StateWriter``): an fsync can take tens of milliseconds on a busy
disk, and a drain changes state at every step transition. Writes are coalesced: only the newest state
is written, so a burst of transitions costs one or two writes, never a queue.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import anyio

from spotguard.deadline import Deadline
from spotguard.drain.timeline import Timeline, TimelineError
from spotguard.notice import Notice

NodeState = Literal["serving", "draining", "drained", "restoring"]
NODE_STATES: tuple[NodeState, ...] = ("serving", "draining", "drained", "restoring")
"""``restoring``: an undrain is putting back what the drain changed (engine, gate, load balancers)."""
STATE_FILE = "state.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, kw_only=True)
class Persisted:
    state: NodeState = "serving"
    notice: Notice | None = None
    """The notice the drain runs for (as its source reported it)."""
    deadline: Deadline | None = None
    """The node's deadline while draining or drained: the earliest notice's (``agent/deadline.py``)."""
    timeline: Timeline | None = None
    """The last drain's timeline (kept after an undrain, for status, until the next drain starts)."""
    restore: Timeline | None = None
    """The last undrain's timeline: what it put back."""
    suppressed: tuple[str, ...] = ()
    """Keys of cloud notices an operator forced away (``undrain --force``); kept across restarts."""
    boot_id: str = ""

    def with_(self, **changes: Any) -> Persisted:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "notice": self.notice.to_json() if self.notice else None,
            "deadline": self.deadline.to_json() if self.deadline else None,
            "timeline": self.timeline.to_json() if self.timeline else None,
            "restore": self.restore.to_json() if self.restore else None,
            "suppressed": list(self.suppressed),
            "boot_id": self.boot_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> tuple[Persisted, str | None]:
        """The state, and what could not be read of its timelines (they are then left out: a drain runs its
        steps again rather than the node coming back into rotation). Anything else unreadable raises."""
        state = data.get("state", "serving")
        if state not in NODE_STATES:
            raise ValueError(f"unknown state {state!r}")
        notice = Notice.from_json(data["notice"]) if data.get("notice") else None
        deadline = Deadline.from_json(data["deadline"]) if data.get("deadline") else None
        suppressed = data.get("suppressed") or []
        if not isinstance(suppressed, list) or not all(isinstance(k, str) for k in suppressed):
            raise ValueError("suppressed is not a list of notice keys")
        problems = []
        timelines: dict[str, Timeline | None] = {}
        for name in ("timeline", "restore"):
            try:
                timelines[name] = _timeline(data.get(name))
            except TimelineError as exc:
                timelines[name] = None
                problems.append(f"{name}: {exc}")
        persisted = cls(state=state, notice=notice, deadline=deadline, timeline=timelines["timeline"],
                        restore=timelines["restore"], suppressed=tuple(suppressed),
                        boot_id=str(data.get("boot_id", "")))
        return persisted, "; ".join(problems) or None


def _timeline(doc: object) -> Timeline | None:
    """A persisted timeline: one document, or the one-document list an older daemon wrote (an upgrade
    mid-drain resumes it); None when there is none."""
    if isinstance(doc, list):
        if len(doc) > 1:
            raise TimelineError(f"expected one timeline, found {len(doc)}")
        doc = doc[0] if doc else None
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise TimelineError(f"expected a timeline document, found {type(doc).__name__}")
    return Timeline.from_json(doc)


class StateStore:
    """Reads and atomically replaces ``<state_dir>/state.json``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    def load(self) -> tuple[Persisted, str | None]:
        """The saved state and, when some of it was unreadable, what (all of it: the daemon then starts
        serving; a timeline: it is left out). Either way the daemon says so."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return Persisted(boot_id=current_boot_id()), None
        except OSError as exc:
            return Persisted(boot_id=current_boot_id()), f"cannot read {self.path}: {exc}"
        try:
            persisted, problem = Persisted.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            return Persisted(boot_id=current_boot_id()), f"corrupt {self.path}: {exc}"
        return persisted, f"{self.path}: {problem}" if problem else None

    def save(self, persisted: Persisted) -> None:
        """Write to a temporary file, fsync, rename: a crash leaves the old or the new file, never half."""
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(persisted.to_json(), sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:
            dir_fd = os.open(self.dir, os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class StateWriter:
    """Writes the newest ``Persisted`` in a worker thread; ``submit`` never blocks the event loop.

    ``run`` is the writer task; ``flush`` writes whatever is still pending (the daemon flushes before it
    exits, so a clean stop never loses the last transition). One lock orders the writes, so an older
    state can never land after a newer one.
    """

    def __init__(self, store: StateStore, on_error: Callable[[OSError], None]) -> None:
        self.store = store
        self._on_error = on_error
        self._pending: Persisted | None = None
        self._wake = anyio.Event()
        self._lock = anyio.Lock()

    def submit(self, persisted: Persisted) -> None:
        self._pending = persisted
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self.flush()

    async def flush_then_set(self, written: anyio.Event) -> None:
        """``flush``, then set ``written``: run as a task, so that a caller can stop waiting for a hung disk
        (``flush`` is shielded, so a scope around it cannot cut it) while the write itself goes on."""
        await self.flush()
        written.set()

    async def flush(self) -> None:
        # Shielded: a write that has begun finishes even while the daemon is being cancelled.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                pending, self._pending = self._pending, None
                if pending is None:
                    return
                try:
                    await anyio.to_thread.run_sync(self.store.save, pending)
                except OSError as exc:
                    self._on_error(exc)
