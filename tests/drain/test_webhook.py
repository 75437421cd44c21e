"""Webhooks against real loopback receivers: bodies, retries, refusals, and a dead URL beside a live one."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spotguard.drain import DrainEngine, plan
from spotguard.drain.notify import Notify
from spotguard.drain.webhook import WebhookFields, default_body, redact, render
from spotguard.metrics import Metrics
from tests.drain.support import FakeEngine, Receiver, config, context, notice, receivers, services

pytestmark = pytest.mark.anyio


def delivered(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("spotguard_webhook_deliveries_total", {"result": result}) or 0.0


def fields(**over: object) -> WebhookFields:
    base: dict[str, object] = dict(event="start", state="draining", source="aws", kind="spot-interruption",
                                   instance="i-0abc", reason="aws spot-interruption", seconds_left=112.4)
    base.update(over)
    return WebhookFields(**base)  # type: ignore[arg-type]


def test_template_placeholders_are_filled_inside_json_strings() -> None:
    template = ('{"text": "{instance} is {state} ({source}/{kind})", "left": "{seconds_left}", '
                '"tags": ["{event}", "why: {reason}"], "quote": "\\"{unknown}\\""}')
    body = render(template, fields(instance='node "7"'))
    assert body == {"text": 'node "7" is draining (aws/spot-interruption)', "left": 112.4,
                    "tags": ["start", "why: aws spot-interruption"], "quote": '"{unknown}"'}
    with pytest.raises(ValueError):
        render("{not json", fields())
    assert default_body(fields())["text"].startswith("spotguard: draining i-0abc")
    assert default_body(fields(dry_run=True))["text"].startswith("[dry run] ")


def test_redact_hides_the_token_in_the_path_and_credentials() -> None:
    assert redact("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/..."
    assert redact("https://user:pw@example.com:8443/x") == "https://example.com:8443/..."


async def test_a_5xx_is_retried_until_delivered_and_a_4xx_is_not() -> None:
    flaky, refusing = Receiver(statuses=[503, 502]), Receiver(statuses=[400, 400, 400])
    metrics = Metrics()
    async with receivers(flaky, refusing):
        cfg = config(urls=[flaky.url, refusing.url], notify_budget=5)
        async with httpx.AsyncClient() as http:
            ctx = context(cfg, notice(seconds=20), services(FakeEngine()), http, metrics=metrics)
            with anyio.fail_after(10):
                timeline = await DrainEngine([Notify("start")], ctx).run()
    step = timeline.step("notify_start")
    assert flaky.requests == 3 and len(flaky.deliveries) == 1
    assert refusing.requests == 1  # a refusal is final
    assert step.outcome == "failed"
    assert "delivered to 1 of 2 webhooks" in step.detail and "HTTP 400 (after 1 attempts)" in step.detail
    assert "SECRET-TOKEN" not in step.detail
    assert delivered(metrics, "delivered") == 1 and delivered(metrics, "rejected") == 1


async def test_a_dead_webhook_delays_neither_the_other_url_nor_other_steps() -> None:
    hung, live = Receiver(hang=True), Receiver()
    metrics = Metrics()
    async with receivers(hung, live):
        # An address nothing listens on, a receiver that never answers, and a live one.
        refused = "http://127.0.0.1:9/hook"
        cfg = config(urls=[refused, hung.url, live.url], notify_budget=2.0)
        async with httpx.AsyncClient() as http:
            ctx = context(cfg, notice(seconds=30), services(FakeEngine(stop_delay=0.2)), http, metrics=metrics)
            engine = DrainEngine(plan(cfg), ctx)
            with anyio.fail_after(10):
                timeline = await engine.run()
    start = timeline.step("notify_start")
    # The live receiver got its delivery before the dead ones gave up (not after them).
    assert live.deliveries and start.finished_at is not None
    assert live.deliveries[0].at < start.finished_at
    # The refused URL was retried until the budget ran out; the hung one never answered.
    assert start.outcome == "failed" and start.duration is not None and start.duration >= 1.8
    assert "delivered to 1 of 3 webhooks" in start.detail
    assert "ConnectError" in start.detail and "no answer within" in start.detail
    # The work went on while the start webhook was stuck.
    stop = timeline.step("stop_accepting")
    assert stop.finished_at is not None and start.finished_at is not None and stop.finished_at < start.finished_at
    assert timeline.step("wait_inflight").outcome == "ok"
    # The end webhook did not wait for the start one: it reached the live URL too.
    assert len(live.deliveries) == 2
    assert delivered(metrics, "delivered") == 2 and delivered(metrics, "failed") + delivered(metrics, "timed_out") == 4


async def test_a_broken_template_falls_back_to_the_default_body_and_is_counted() -> None:
    hook = Receiver()
    metrics = Metrics()
    async with receivers(hook):
        cfg = config(urls=[hook.url]).replace("webhook", template="{oops")
        async with httpx.AsyncClient() as http:
            ctx = context(cfg, notice(seconds=20, source="manual", kind="operator", payload="kernel upgrade"),
                          services(FakeEngine()), http, metrics=metrics)
            with anyio.fail_after(10):
                await DrainEngine([Notify("start")], ctx).run()
    assert hook.deliveries[0].body["text"].startswith("spotguard: draining i-0abc (kernel upgrade)")
    assert metrics.registry.get_sample_value("spotguard_errors_total",
                                             {"component": "webhook", "reason": "template"}) == 1
