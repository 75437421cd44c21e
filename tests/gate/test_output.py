"""The incremental SSE / final-body parser that fills journal entries."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotguard.gate.output import MAX_PENDING, OutputParser, request_meta
from tests.support.openai_upstream import chat_chunk, completion_chunk, final_body, token

pytestmark = pytest.mark.anyio


def chat_stream(n: int) -> bytes:
    return b"".join(chat_chunk(i, token(i)) for i in range(n)) + chat_chunk(n, None, "stop") + b"data: [DONE]\n\n"


@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30), crlf=st.booleans())
async def test_any_chunking_gives_the_same_output(cuts: list[int], crlf: bool) -> None:
    stream = chat_stream(12)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    parser = OutputParser(chat=True)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        parser.feed(stream[start:end])
    parser.finish()
    assert parser.text == "".join(token(i) for i in range(12))
    assert parser.finish_reason == "stop" and parser.errors == 0


async def test_completions_stream_and_final_bodies() -> None:
    parser = OutputParser(chat=False)
    parser.feed(completion_chunk("a") + completion_chunk("b", "length") + b"data: [DONE]\n\n")
    parser.flush()
    assert (parser.text, parser.finish_reason) == ("ab", "length")
    for chat in (True, False):
        final = OutputParser(chat=chat)
        final.parse_body(final_body(chat, "whole answer"))
        assert final.output == ["whole answer"] and final.finish_reason == "length"


async def test_llama_cpp_extras_are_understood() -> None:
    parser = OutputParser(chat=False)
    verbose = {"choices": [{"text": "x", "index": 0, "finish_reason": None}], "__verbose": {"id_slot": 3}}
    parser.feed(b": ping\n\nevent: message\ndata: " + json.dumps(verbose).encode() + b"\n\n")
    usage_only = {"choices": [], "usage": {"completion_tokens": 1}}
    parser.feed(b"data: " + json.dumps(usage_only).encode() + b"\n\n")
    parser.feed(b'data: {"error": {"message": "context full"}}\n\n')
    parser.finish()
    assert (parser.output, parser.slot_id, parser.errors) == (["x"], 3, 0)


@pytest.mark.parametrize("garbage", [b"data: {nope\n\n", b"data: [1,2]\n\n", b"data: {}\n\n",
                                     b'data: {"choices": [{"delta": {"content": 5}}]}\n\n', b"data: null\n\n"])
async def test_garbage_is_counted_not_raised(garbage: bytes) -> None:
    parser = OutputParser(chat=True)
    parser.feed(chat_chunk(0, "ok") + garbage + chat_chunk(1, "!"))
    assert parser.output == []  # parsed in batches: nothing until flushed
    parser.flush()
    assert parser.text == "ok!" and parser.errors == 1


async def test_output_is_up_to_date_whenever_the_journal_is_read() -> None:
    from spotguard.gate.registry import Flight, Registry

    class Owner:
        def interrupt(self, *, migrate: bool) -> None: ...

    registry = Registry()
    parser = OutputParser(chat=True)
    registry.add(Flight(id="req-1", endpoint="/v1/chat/completions", model="m", body=b"{}", stream=True,
                        parser=parser, owner=Owner()))
    for i in range(3):
        parser.feed(chat_chunk(i, token(i)))
        [seen] = registry.entries()
        assert seen.output == "".join(token(j) for j in range(i + 1))
        assert seen.tokens == i + 1
    parser.feed(b"data: 1, 2\n\n" + chat_chunk(3, "x"))  # a payload that is a comma list does not shift the rest
    [seen] = registry.entries()
    assert seen.output.endswith("x") and parser.errors == 1


async def test_a_long_stream_is_parsed_as_it_goes() -> None:
    from spotguard.gate.output import BATCH_BYTES

    parser = OutputParser(chat=True)
    fed: list[int] = []
    while parser.output == []:
        chunk = chat_chunk(len(fed), token(len(fed)))
        parser.feed(chunk)
        fed.append(len(chunk))
    # parsed exactly when a batch's worth had piled up, every event of it
    assert sum(fed) >= BATCH_BYTES > sum(fed[:-1])
    assert parser.text == "".join(token(i) for i in range(len(fed)))


async def test_a_stream_without_newlines_stops_being_parsed() -> None:
    parser = OutputParser(chat=True)
    parser.feed(b"x" * (MAX_PENDING + 1))
    parser.feed(chat_chunk(0, "late"))
    parser.finish()
    assert parser.output == [] and parser.errors == 1


def test_request_meta() -> None:
    assert request_meta(b'{"model": "m", "stream": true, "id_slot": 1}') == ("m", True, 1)
    assert request_meta(b'{"stream": "yes", "id_slot": -1}') == ("", False, None)
    assert request_meta(b"[1]") is None and request_meta(b"{") is None
