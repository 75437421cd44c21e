"""Continuation bodies and the stitching of a peer's answer onto the client's: pure functions, and the
peer's stream cut at every possible place gives the same bytes to the client."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotguard.gate.continuation import NotContinuable, continuation_body
from spotguard.gate.stitch import AnswerIdentity, StreamStitch

LOCAL = AnswerIdentity(id="chatcmpl-local", model="tiny", created=111, object="chat.completion.chunk")


def chunk(text: str | None, *, role: bool = False, finish: str | None = None, ident: str = "chatcmpl-peer",
          usage: dict[str, int] | None = None) -> bytes:
    delta: dict[str, str] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    event: dict[str, object] = {"id": ident, "object": "chat.completion.chunk", "created": 999, "model": "peer-model",
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        event["usage"] = usage
    return b"data: " + json.dumps(event).encode() + b"\n\n"


PEER_STREAM = (chunk(None, role=True) + chunk(" world") + b": ping\n\n" + chunk("!", finish="length")
               + chunk(None, usage={"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14})
               + b"data: [DONE]\n\n")


def events(raw: bytes) -> list[object]:
    return [json.loads(block[6:]) if block != b"data: [DONE]" else "[DONE]"
            for block in raw.split(b"\n\n") if block]


def test_a_peer_stream_becomes_the_rest_of_the_clients() -> None:
    stitch = StreamStitch(LOCAL, chat=True, role_sent=True, delivered=3)
    out = events(stitch.feed(PEER_STREAM) + stitch.finish())
    assert out[-1] == "[DONE]" and out.count("[DONE]") == 1
    chunks = [e for e in out if isinstance(e, dict)]
    assert all(c["id"] == "chatcmpl-local" and c["model"] == "tiny" and c["created"] == 111 for c in chunks)
    assert not any("role" in c["choices"][0]["delta"] for c in chunks if c["choices"])  # role not sent twice
    assert "".join(stitch.text) == " world!" and stitch.finish_reason == "length"
    usage = chunks[-1]["usage"]
    assert usage == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}  # the 3 before the seam


@given(st.lists(st.integers(min_value=0, max_value=len(PEER_STREAM)), max_size=8))
def test_where_the_peer_stream_is_cut_changes_nothing(cuts: list[int]) -> None:
    whole = StreamStitch(LOCAL, chat=True, role_sent=True, delivered=3)
    expected = whole.feed(PEER_STREAM) + whole.finish()
    stitch = StreamStitch(LOCAL, chat=True, role_sent=True, delivered=3)
    bounds = [0, *sorted(cuts), len(PEER_STREAM)]
    got = b"".join(stitch.feed(PEER_STREAM[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) + stitch.finish()
    assert got == expected


@given(st.lists(st.integers(min_value=0, max_value=len(PEER_STREAM) * 2), max_size=8))
def test_a_peer_framing_its_events_with_crlf_is_joined_the_same(cuts: list[int]) -> None:
    whole = StreamStitch(LOCAL, chat=True, role_sent=True, delivered=3)
    expected = whole.feed(PEER_STREAM) + whole.finish()
    crlf = PEER_STREAM.replace(b"\n", b"\r\n")
    stitch = StreamStitch(LOCAL, chat=True, role_sent=True, delivered=3)
    bounds = [0, *sorted(c for c in cuts if c <= len(crlf)), len(crlf)]
    got = b"".join(stitch.feed(crlf[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) + stitch.finish()
    assert got == expected and not stitch.broken


def test_after_a_malformed_peer_event_nothing_passes_and_the_answer_is_not_passed_off_as_whole() -> None:
    stitch = StreamStitch(LOCAL, chat=True, role_sent=True, delivered=3)
    out = stitch.feed(chunk(" world") + b"data: {not json\n\n" + chunk("!") + b"data: [DONE]\n\n")
    assert stitch.broken and [e["choices"][0]["delta"] for e in events(out)] == [{"content": " world"}]  # type: ignore[index]
    assert stitch.feed(chunk("more")) == b"" and stitch.finish() == b""  # no [DONE]: the leg ends it as interrupted


def test_a_peer_that_ends_without_done_still_gives_one() -> None:
    stitch = StreamStitch(LOCAL, chat=True, role_sent=False, delivered=0)
    out = events(stitch.feed(chunk(None, role=True) + chunk("hi")) + stitch.finish())
    assert out[-1] == "[DONE]" and out[0]["choices"][0]["delta"]["role"] == "assistant"  # type: ignore[index]


def test_continuation_bodies() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    body = continuation_body(chat, chat=True, output="Hel", delivered=2, engine="vllm")
    assert body["messages"][-1] == {"role": "assistant", "content": "Hel"} and body["max_tokens"] == 8
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert chat["max_tokens"] == 10 and len(chat["messages"]) == 1  # the original is not touched
    plain = continuation_body({"prompt": ["Once"], "max_completion_tokens": 5}, chat=False, output=" upon",
                              delivered=1)
    assert plain["prompt"] == "Once upon" and plain["max_completion_tokens"] == 4
    assert "continue_final_message" not in continuation_body(chat, chat=True, output="x", delivered=0)
    for bad, why in [({**chat, "n": 2}, "n > 1"), ({**chat, "max_tokens": 2}, "budget"),
                     ({"prompt": [1, 2, 3]}, "token-id"), ({"prompt": "a", "echo": True}, "echo")]:
        with pytest.raises(NotContinuable, match=why):
            continuation_body(bad, chat="messages" in bad, output="x", delivered=2)
    with pytest.raises(NotContinuable, match="tool call"):
        continuation_body(chat, chat=True, output="", delivered=0, tool_call_started=True)


@pytest.mark.parametrize("key", ["n", "best_of", "max_tokens", "max_completion_tokens", "n_predict"])
@pytest.mark.parametrize("value", [2.0, 10.0, "3", True, [1], {"n": 1}])
def test_a_count_or_limit_that_is_not_an_integer_is_not_continued(key: str, value: object) -> None:
    """vLLM reads n: 2.0 as two choices and a string max_tokens as whatever its validator makes of it: a
    continuation would then get several choices, or the whole budget again."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, key: value}
    with pytest.raises(NotContinuable, match=f"not an integer \\({key}\\)"):
        continuation_body(chat, chat=True, output="x", delivered=2)


def test_null_counts_are_absent() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": None, "n": None,
            "best_of": None}
    body = continuation_body(chat, chat=True, output="x", delivered=2)
    assert body["max_tokens"] is None and body["messages"][-1] == {"role": "assistant", "content": "x"}


def test_peers_rotate_and_a_failed_one_goes_last() -> None:
    from spotguard.errors import ConfigError
    from spotguard.gate.peers import Peers

    peers = Peers(["http://a:1", "http://b:2/v/", "https://c"])
    assert [p.url for p in peers.order()] == ["http://a:1", "http://b:2/v", "https://c"]
    assert [p.url for p in peers.order()] == ["http://b:2/v", "https://c", "http://a:1"]
    peers.failed(peers.peers[2])
    assert [p.url for p in peers.order()] == ["http://a:1", "http://b:2/v", "https://c"]  # c goes last
    assert peers.peers[1].prefix == b"/v" and peers.peers[2].host_line == b"host: c\r\n"
    with pytest.raises(ConfigError, match="peers"):
        Peers(["ftp://x"])
    assert not Peers([])


def test_only_whole_events_reach_the_client_before_a_seam() -> None:
    # A migration drops what is held back: so nothing of an unfinished event may have been sent before it.
    from spotguard.gate.answer import ClientAnswer

    class Client:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

    client = Client()
    answer = ClientAnswer(client, None, retry_after=b"1")  # type: ignore[arg-type]
    answer.whole_events = True
    answer.write(b"data: {\"a\"")
    assert client.sent == []
    answer.write(b": 1}\n\ndata: {\"b\"")
    assert client.sent == [b"data: {\"a\": 1}\n\n"] and answer.held == b"data: {\"b\""
    answer.write(b": 2}\r\n\r\n")
    assert client.sent[-1] == b"data: {\"b\": 2}\r\n\r\n"
