"""The Ollama backend keeps its HTTP connection between replies (issue 22): a streamed reply is
read to its end, so the connection goes back to the client's pool instead of being closed."""

from __future__ import annotations

from bot.brains.base import ChatRequest
from bot.brains.ollama_brain import OllamaBrain
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
