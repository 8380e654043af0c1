"""The Ollama backend keeps its HTTP connection between replies (issue 22): a streamed reply is
read to its end, so the connection goes back to the client's pool instead of being closed."""

from __future__ import annotations

import asyncio

import pytest

from bot.brains.base import ChatRequest
from bot.brains.ollama_brain import OllamaBrain
from bot.errors import ModelUnavailable
from tests.fakes.loopback import dead_url
from tests.fakes.ollama import FakeOllama


def request(text: str) -> ChatRequest:
    return ChatRequest(
        model="llama3.2:3b",
        messages=[{"role": "user", "content": text}],
        temperature=0.5,
        seed=1,
        max_tokens=50,
        context_window=2048,
    )


async def test_streamed_replies_share_one_connection(fake_ollama: FakeOllama) -> None:
    brain = OllamaBrain(fake_ollama.url)
    try:
        for n in range(3):
            fake_ollama.queue_reply(f"reply number {n}, in a few pieces")
            chunks = [chunk async for chunk in brain.stream(request(f"hi {n}"))]
            assert "".join(c.text for c in chunks) == f"reply number {n}, in a few pieces"
            assert chunks[-1].stats is not None and chunks[-1].stats.completion_tokens
    finally:
        await brain.aclose()
    assert len(fake_ollama.peers) == 3
    assert len(set(fake_ollama.peers)) == 1, "each reply opened a new connection"


async def test_a_reply_stopped_early_still_ends_cleanly(fake_ollama: FakeOllama) -> None:
    brain = OllamaBrain(fake_ollama.url)
    try:
        fake_ollama.queue_reply("one two three four five six seven")
        stream = brain.stream(request("hi"))
        first = await anext(stream)
        await stream.aclose()  # the user's reply was cut short: the connection may go
        assert first.text
        fake_ollama.queue_reply("after")
        assert "".join([c.text async for c in brain.stream(request("again"))]) == "after"
    finally:
        await brain.aclose()


async def test_many_conversations_at_once_are_not_held_to_httpx_defaults(
    fake_ollama: FakeOllama,
) -> None:
    """Through httpx's own pool (100 connections, 20 kept idle) the 101st reply waited for a
    connection and most replies beyond 20 at once opened a new one (bot/brains/http.py). 120 at
    once, twice: the second wave reuses the first's connections."""
    brain = OllamaBrain(fake_ollama.url)
    fake_ollama.first_token_delay = 2.0  # all 120 in flight at once, on a busy machine too

    async def one(n: int) -> str:
        return "".join([c.text async for c in brain.stream(request(f"hi {n}"))])

    try:
        first = await asyncio.gather(*(one(n) for n in range(120)))
        assert all(first) and fake_ollama.max_active == 120
        await asyncio.gather(*(one(n) for n in range(120)))
    finally:
        await brain.aclose()
    assert len(fake_ollama.peers) == 240
    assert len(set(fake_ollama.peers)) == 120, "the second wave opened new connections"


async def test_a_server_that_hangs_up_is_not_taken_for_a_slow_one() -> None:
    """A hang-up is a RemoteProtocolError (bot/brains/http.py), so the reason logged and shown
    is not "did not answer in time" (httpx-aiohttp, used before, mapped it to a time-out)."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    brain = OllamaBrain(f"http://127.0.0.1:{port}", read_timeout=30)
    try:
        with pytest.raises(ModelUnavailable) as caught:
            [c async for c in brain.stream(request("hi"))]
    finally:
        await brain.aclose()
        server.close()
    assert "in time" not in str(caught.value) and "aiohttp" not in str(caught.value)
    assert "RemoteProtocolError" in str(caught.value)


async def test_a_proxy_in_the_environment_is_used_as_httpx_used_it(
    fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured (as httpx's and aiohttp's `trust_env` read it): the request for an
    Ollama nobody listens at reaches the proxy, here the fake itself, which answers it."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", fake_ollama.url)
    brain = OllamaBrain(dead_url())
    try:
        fake_ollama.queue_reply("through the proxy")
        assert "".join([c.text async for c in brain.stream(request("hi"))]) == "through the proxy"
    finally:
        await brain.aclose()
