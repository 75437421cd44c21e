"""The agent: what turns notices into drains, one part per concern.

    SourceWatcher ──report──> NoticeBook ──due──> NodeMachine ──run / restore──> DrainDriver
    (poll loops, backoff,      (live notices,      (serving/draining/drained/
     health, error counts)      dedup, withdrawal)   restoring, persisted)
                                      │                    │
                                      └──earliest due──> DeadlineOwner ──> the drain, the gate, status, metrics
    OperatorApi: manual drain, undrain (control socket), the status document (/status)

as aws-node-termination-handler splits monitor -> event store -> handlers. The daemon builds one ``Agent``
and reaches each part by name; ``run`` starts the node's state machine, then the poll loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from spotguard.agent.deadline import DeadlineOwner
from spotguard.agent.node import DrainDriver, NodeMachine, load_state
from spotguard.agent.notices import NoticeBook
from spotguard.agent.operator import OperatorApi
from spotguard.agent.sources import SourceWatcher
from spotguard.agent.state import StateStore
from spotguard.config import Config
from spotguard.metrics import Metrics
from spotguard.notice import NoticeSource


class Agent:
    """One per daemon: its parts, and the task group they run in."""

    def __init__(self, *, config: Config, cloud: str, metrics: Metrics, log: Any, store: StateStore,
                 sources: Sequence[NoticeSource], driver: DrainDriver) -> None:
        self.metrics = metrics
        persisted = load_state(store, log=log, metrics=metrics)
        self.deadline = DeadlineOwner(config.drain.safety_margin, metrics=metrics, log=log)
        self.notices = NoticeBook(metrics=metrics, log=log, suppressed=persisted.suppressed)
        self.watcher = SourceWatcher(config=config, metrics=metrics, log=log, report=self.notices.report)
        self.node = NodeMachine(config=config, persisted=persisted, store=store, driver=driver,
                                notices=self.notices, deadline=self.deadline, metrics=metrics, log=log)
        self.operator = OperatorApi(config=config, cloud=cloud, node=self.node, notices=self.notices,
                                    watcher=self.watcher, deadline=self.deadline, driver=driver, log=log)
        self._sources = list(sources)
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.node.run, name="node")
            self.watcher.start(tg, self._sources)
            task_status.started()

    def add_sources(self, sources: Sequence[NoticeSource]) -> None:
        """Start polling sources found after start-up (a cloud confirmed late by a re-probe)."""
        assert self._tg is not None, "add_sources before run()"
        self.watcher.start(self._tg, sources)
