"""The notify steps: a webhook as soon as a drain starts, and one once the work is over."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from spotguard.drain.balancers import CORE_STEPS, outcome_of
from spotguard.drain.fanout import fan_out, summary
from spotguard.drain.step import DrainContext, StepResult
from spotguard.drain.timeline import StepRecord, verdict
from spotguard.drain.webhook import Event, WebhookFields, default_body, deliver, redact, render

REASON_LIMIT = 200


def reason(ctx: DrainContext) -> str:
    """Why the drain runs. An operator's reason (manual drains) is shown; a cloud payload never is."""
    notice = ctx.notice
    if notice.source == "manual" and notice.payload:
        return notice.payload[:REASON_LIMIT]
    return f"{notice.source} {notice.kind}"


def end_state(records: Sequence[StepRecord], *, dry_run: bool) -> str:
    """What the end webhook says of the node: errors only when a step failed or ran out of time; a drain
    that handed requests to peers lost nothing, and says how many went."""
    result = verdict(records, dry_run=dry_run)
    if result == "failed":
        return "drained with errors"
    handed = sum(r.handed_over for r in records)
    if result == "handed_over":
        return f"drained, {handed} request{'s' if handed != 1 else ''} handed to peers"
    return "drained"


def fields(ctx: DrainContext, event: Event) -> WebhookFields:
    identity = ctx.services.identity
    outcomes = ""
    state = "draining"
    if event == "end":
        state = "drained"
        if ctx.progress is not None:
            records = [r for r in ctx.progress().steps if r.name in CORE_STEPS]
            outcomes = ", ".join(f"{r.name} {r.outcome or r.state}" for r in records)
            state = end_state(records, dry_run=ctx.dry_run)
    return WebhookFields(event=event, state=state, source=ctx.notice.source, kind=ctx.notice.kind,
                         instance=identity.vm_name or identity.instance_id or "this node", reason=reason(ctx),
                         seconds_left=ctx.seconds_left(), dry_run=ctx.dry_run, summary=outcomes)


def body(ctx: DrainContext, event: Event) -> dict[str, object] | list[object]:
    """The templated body, or the default one when the template is empty or broken (counted, logged)."""
    values = fields(ctx, event)
    template = ctx.config.webhook.template
    if template:
        try:
            return render(template, values)
        except (ValueError, json.JSONDecodeError) as exc:
            ctx.log.error("webhook template unusable; sending the default body",
                          error=str(exc), setting="[webhook] template")
            ctx.metrics.config_errors.labels(component="webhook", reason="template").inc()
    return default_body(values)


class Notify:
    """POST the drain's start (``notify_start``) or end (``notify_end``) to every webhook URL."""

    def __init__(self, event: Event) -> None:
        self.event: Event = event
        self._name = f"notify_{event}"
        # The end waits for the work (not for acknowledge, nor for a slow start webhook).
        self._after: tuple[str, ...] = CORE_STEPS if event == "end" else ()
        self.floor = 0.0

    @property
    def name(self) -> str:
        return self._name

    @property
    def after(self) -> tuple[str, ...]:
        return self._after

    def budget(self, ctx: DrainContext) -> float:
        return ctx.config.drain.notify_budget

    async def run(self, ctx: DrainContext) -> str | StepResult:
        urls = ctx.config.webhook.urls
        if not urls:
            return StepResult("skipped", "no webhook configured")
        payload = body(ctx, self.event)
        if ctx.dry_run:
            where = ", ".join(redact(u) for u in urls)
            return StepResult("dry_run", f"would POST the drain {self.event} to {len(urls)} webhooks ({where})")
        calls: dict[str, Callable[[], Awaitable[str]]] = {}
        for index, url in enumerate(urls, 1):
            calls[f"#{index} {redact(url)}"] = partial(
                deliver, ctx.http, url, payload, timeout=ctx.config.webhook.timeout, metrics=ctx.metrics)
        results = await fan_out(calls)
        delivered = sum(1 for r in results if r.ok)
        detail = f"delivered to {delivered} of {len(results)} webhooks"
        if delivered < len(results):
            detail += ": " + summary([r for r in results if not r.ok])
        return outcome_of(results, ctx, detail)
