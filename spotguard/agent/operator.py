"""What an operator reaches: a manual drain and an undrain (the control socket), and the status document.

A manual drain is a notice like any other (``clouds/operator.manual_notice``): on a serving (or restoring)
node it starts a drain; on a node already draining or drained, an earlier deadline becomes the node's
deadline and nothing else changes. An undrain is refused while the platform says the VM is going away,
unless forced; a forced undrain suppresses those notices until they are withdrawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from spotguard.agent.deadline import DeadlineOwner
from spotguard.agent.node import DrainDriver, NodeMachine
from spotguard.agent.notices import NoticeBook, public_notice
from spotguard.agent.sources import SourceWatcher
from spotguard.clouds.operator import manual_notice
from spotguard.config import Config
from spotguard.drain.timeline import Timeline
from spotguard.notice import rfc3339, utcnow

DRAIN_START_WAIT = 5.0
"""Seconds a manual drain waits for the node to start draining before answering."""
UNDRAIN_ANSWER_WAIT = 8.0
"""Seconds ``undrain`` waits for the restore before answering (the control socket allows 10)."""


def steps(timeline: Timeline | None) -> list[dict[str, Any]]:
    """A timeline's step records as /status shows them."""
    return [record.to_json() for record in timeline.steps] if timeline is not None else []


class OperatorApi:
    """Implements the control socket's ``Controller`` and the HTTP API's ``StatusView``."""

    def __init__(self, *, config: Config, cloud: str, node: NodeMachine, notices: NoticeBook,
                 watcher: SourceWatcher, deadline: DeadlineOwner, driver: DrainDriver, log: Any) -> None:
        self.cloud = cloud
        """``unknown`` until [agent] cloud = auto is confirmed (the wiring sets it then)."""
        self.status_extras: list[Callable[[], dict[str, Any]]] = []
        """Sections other parts of the daemon add to the status document (readiness, cloud)."""
        self._config = config
        self._node = node
        self._notices = notices
        self._watcher = watcher
        self._deadline = deadline
        self._driver = driver
        self._log = log
        self._started_at = utcnow()

    def health(self) -> dict[str, dict[str, Any]]:
        return self._watcher.health()

    def status(self) -> dict[str, Any]:
        node, deadline = self._node, self._deadline.current
        doc: dict[str, Any] = {
            "state": node.state,
            "cloud": self.cloud,
            "notice": public_notice(node.notice),
            "deadline": deadline.to_json() if deadline else None,
            "seconds_left": round(deadline.vm_seconds_left(), 3) if deadline else None,
            # What the drain works to: the VM's deadline less [drain] safety_margin (status, --svg).
            "drain_deadline": rfc3339(deadline.drain) if deadline else None,
            "drain_result": node.timeline.summary() if node.timeline else None,
            "steps": steps(node.timeline),
            "restore_steps": steps(node.restore_timeline),
            "live_notices": [public_notice(n) for n in self._notices.live()],
            "observed": [public_notice(n) for n in self._notices.observed()],
            "sources": self._watcher.health(),
            "dry_run": self._config.agent.dry_run,
            "started_at": rfc3339(self._started_at),
        }
        for extra in self.status_extras:
            doc.update(extra())
        return doc

    async def manual_drain(self, reason: str, deadline_seconds: float | None, dry_run: bool) -> dict[str, Any]:
        seconds = deadline_seconds if deadline_seconds is not None else self._config.drain.manual_deadline
        notice = manual_notice(reason, seconds)
        if dry_run:
            timeline = await self._driver.run(notice, self._deadline.for_notice(notice), None, dry_run=True,
                                              on_change=lambda _t: None)
            return {"dry_run": True, "notice": public_notice(notice), "steps": steps(timeline)}
        state = self._node.state
        if state in ("draining", "drained"):
            if self._deadline.adopt(notice):  # to the running drain, the gate's relays, status and metrics
                deadline = self._deadline.current
                assert deadline is not None
                return {"accepted": True, "started": False, "state": state, "notice": public_notice(self._node.notice),
                        "deadline": deadline.to_json(),
                        "message": f"already {state}; the deadline is now {rfc3339(deadline.vm)} "
                                   f"({deadline.vm_seconds_left():.0f}s from now), earlier than before"}
            return {"accepted": False, "state": state, "message": f"already {state}",
                    "notice": public_notice(self._node.notice)}
        self._notices.inject(notice)  # a restore under way is stopped for it, as for a cloud notice
        with anyio.fail_after(DRAIN_START_WAIT):
            while self._node.state in ("serving", "restoring"):
                await self._node.state_changed()
        return {"accepted": True, "state": self._node.state, "notice": public_notice(notice)}

    async def undrain(self, force: bool) -> dict[str, Any]:
        cloud_live = self._notices.cloud_drains()
        state = self._node.state
        if cloud_live and not force:
            return {"accepted": False, "state": state,
                    "message": "a cloud notice is live: this VM is going away (use --force to serve anyway)",
                    "live_notices": [public_notice(n) for n in cloud_live]}
        if state == "draining" and not force:
            return {"accepted": False, "state": state,
                    "message": "a drain is running; wait for it to finish or use --force"}
        self._notices.forget_operator_notices()
        if force and cloud_live:
            self._notices.suppress(n.key for n in cloud_live)
        self._node.stop_drain()
        self._log.warning("undrained", forced=force, suppressed=len(self._notices.suppressed))
        if state in ("serving", "restoring"):
            return {"accepted": True, "state": state, "message": f"already {state}",
                    "steps": steps(self._node.restore_timeline)}
        restored = self._node.begin_restore()
        # The operator sees what was put back; a slow engine start goes on and `status` shows it.
        with anyio.move_on_after(UNDRAIN_ANSWER_WAIT):
            await restored
        done = self._node.state == "serving"
        return {"accepted": True, "state": self._node.state,
                "message": "undrained: serving again" if done else
                           "undrained: still putting things back (see spotguard status)",
                "steps": steps(self._node.restore_timeline)}
