"""The gate process in front of engines that bend HTTP the way real ones do: an answer before the body was
read, interim 1xx answers, an upgrade. Raw sockets on the client side, a raw server on the engine side (see
tests/support/_quirky_engine.py): every byte on both wires is what the test says."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from tests.support._gate_process import exchange, gate_process, read_response, status_of
from tests.support._quirky_engine import quirky_engine

pytestmark = pytest.mark.anyio


def body_of(answer: bytes) -> dict[str, object]:
    doc: dict[str, object] = json.loads(answer.partition(b"\r\n\r\n")[2])
    return doc


async def test_an_engine_that_answers_before_reading_the_body_does_not_swallow_the_next_request(
        tmp_path: Path) -> None:
    """vLLM with --api-key (and anything on uvicorn) answers 401 before reading the body and keeps the
    connection. Pooled then, that connection gave the next client's request to the engine as the rest of the
    first body: the next client waited for the read timeout (600 s)."""
    async with quirky_engine() as engine:
        with gate_process(tmp_path, engine.url) as gate, anyio.fail_after(40):
            async with await anyio.connect_tcp("127.0.0.1", gate.port) as first:
                await first.send(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1000\r\n\r\n" + b'{"input": ')  # ... and never the rest: it leaves
                refused = await read_response(first)
            assert status_of(refused) == 401, refused
            answer = await exchange(gate.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                    timeout=15)
    assert status_of(answer) == 200, answer[:300]
    assert [s.target for s in engine.seen] == ["/v1/embeddings", "/health"]


async def test_interim_answers_are_skipped_and_the_final_one_goes_to_its_own_request(tmp_path: Path) -> None:
    """``103 Early Hints`` before the 200 was taken as the answer; the real 200 was left for the next request."""
    async with quirky_engine() as engine:
        with gate_process(tmp_path, engine.url) as gate, anyio.fail_after(40):
            async with await anyio.connect_tcp("127.0.0.1", gate.port) as client:
                answers = []
                for _ in range(2):
                    await client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                    answers.append(await read_response(client))
    assert [status_of(a) for a in answers] == [200, 200], answers
    assert [body_of(a)["request"] for a in answers] == [1, 2]
    assert all(b"103" not in a.split(b"\r\n", 1)[0] for a in answers)


async def test_an_engine_that_switches_protocols_gets_a_502_and_the_gate_carries_on(tmp_path: Path) -> None:
    async with quirky_engine() as engine:
        with gate_process(tmp_path, engine.url) as gate, anyio.fail_after(40):
            upgraded = await exchange(gate.port, b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                      b"Connection: close\r\n\r\n{}")
            after = await exchange(gate.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(upgraded) == 502 and b"does not proxy upgrades" in upgraded, upgraded
    assert status_of(after) == 200
