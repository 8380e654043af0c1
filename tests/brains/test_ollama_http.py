"""bot/brains/http.py speaks to Ollama as the official `ollama` client does: the same request
bodies and the same parsed answers, for every call the bot makes, and its failures raise what
the callers word (httpx's transport errors, ollama.ResponseError)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import ollama
import pytest
from aiohttp import web

from bot.brains.base import ChatRequest
from bot.brains.http import OllamaHTTP, ollama_client
from bot.brains.ollama_brain import OllamaBrain
from bot.errors import ModelInterrupted
from tests.fakes.loopback import dead_url, serve
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:3b"
SCHEMA = {"type": "object", "properties": {"facts": {"type": "array"}}}
OPTIONS = {"temperature": 0.5, "seed": 7, "num_predict": 40, "num_ctx": 2048}
TOOL = {
    "type": "function",
    "function": {
        "name": "remember",
        "description": "Keep a note.",
        "parameters": {"type": "object", "properties": {"note": {"type": "string"}}},
    },
}
# a conversation with the shapes the engine sends: an empty field, a tool call and its result
MESSAGES = [
    {"role": "system", "content": "You are Mimi."},
    {"role": "user", "content": "hello there", "images": []},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "remember", "arguments": {"note": "hi"}}}],
    },
    {"role": "tool", "content": "noted", "tool_name": "remember"},
    {"role": "user", "content": "and now?"},
]


@pytest.fixture
async def ours(fake_ollama: FakeOllama) -> AsyncIterator[OllamaHTTP]:
    client = ollama_client(fake_ollama.url, read_timeout=30, connect_timeout=3)
    yield client
    await client.close()


@pytest.fixture
async def official(fake_ollama: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=fake_ollama.url) as client:
        yield client


async def both(
    fake: FakeOllama,
    theirs: Callable[[], Awaitable[Any]],
    mine: Callable[[], Awaitable[Any]],
) -> tuple[Any, Any]:
    """Each client's answer to the same call, after checking the server got the same body."""
    fake.reset()
    expected = await theirs()
    sent = list(fake.requests)
    fake.reset()
    got = await mine()
    assert fake.requests == sent
    return expected, got


async def test_a_streamed_chat_with_tools_sends_and_reads_what_the_official_client_does(
    fake_ollama: FakeOllama, ours: OllamaHTTP, official: ollama.AsyncClient
) -> None:
    async def theirs() -> list[ollama.ChatResponse]:
        fake_ollama.queue_tool_call("remember", {"note": "likes tea"}, text="Sure, ")
        stream = await official.chat(
            model=MODEL, messages=MESSAGES, tools=[TOOL], stream=True, options=OPTIONS,
            keep_alive="10m",
        )  # fmt: skip
        return [part async for part in stream]

    async def mine() -> list[ollama.ChatResponse]:
        fake_ollama.queue_tool_call("remember", {"note": "likes tea"}, text="Sure, ")
        stream = ours.chat_stream(
            model=MODEL, messages=MESSAGES, tools=[TOOL], options=OPTIONS, keep_alive="10m"
        )
        return [part async for part in stream]

    expected, got = await both(fake_ollama, theirs, mine)
    assert [p.model_dump(exclude={"created_at"}) for p in got] == [
        p.model_dump(exclude={"created_at"}) for p in expected
    ]
    assert got[-1].done and got[-1].eval_count
    calls = [c for p in got for c in p.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("remember", {"note": "likes tea"})
    ]
    sent = fake_ollama.chat_requests()[0]["messages"]
    assert "content" not in sent[2] and "images" not in sent[1]  # empty fields left out


async def test_a_chat_without_tools_sends_an_empty_list_as_the_official_client_does(
    fake_ollama: FakeOllama, ours: OllamaHTTP, official: ollama.AsyncClient
) -> None:
    async def theirs() -> list[ollama.ChatResponse]:
        stream = await official.chat(model=MODEL, messages=MESSAGES[:2], stream=True)
        return [part async for part in stream]

    async def mine() -> list[ollama.ChatResponse]:
        return [part async for part in ours.chat_stream(model=MODEL, messages=MESSAGES[:2])]

    expected, got = await both(fake_ollama, theirs, mine)
    assert "".join(p.message.content or "" for p in got) == "".join(
        p.message.content or "" for p in expected
    )
    assert fake_ollama.chat_requests()[0]["tools"] == []
    assert fake_ollama.chat_requests()[0]["messages"][1] == {
        "role": "user",
        "content": "hello there",
    }


async def test_structured_output_generate_and_embed_match_the_official_client(
    fake_ollama: FakeOllama, ours: OllamaHTTP, official: ollama.AsyncClient
) -> None:
    expected, got = await both(
        fake_ollama,
        lambda: official.chat(
            model=MODEL, messages=MESSAGES[:2], format=SCHEMA, options=OPTIONS, stream=False
        ),
        lambda: ours.chat(model=MODEL, messages=MESSAGES[:2], format=SCHEMA, options=OPTIONS),
    )
    assert got.message.content == expected.message.content
    assert isinstance(json.loads(got.message.content or ""), dict)
    assert got.prompt_eval_count == expected.prompt_eval_count > 0

    prompt = "<|begin_of_text|>[INST] Is this safe? [/INST]"
    expected, got = await both(
        fake_ollama,
        lambda: official.generate(
            model=MODEL, prompt=prompt, raw=True, stream=False, options=OPTIONS, keep_alive=300
        ),
        lambda: ours.generate(
            model=MODEL, prompt=prompt, raw=True, options=OPTIONS, keep_alive=300
        ),
    )
    assert got.response == expected.response and got.done

    expected, got = await both(
        fake_ollama,
        lambda: official.embed(model="nomic-embed-text", input=["one", "two"]),
        lambda: ours.embed(model="nomic-embed-text", input=["one", "two"]),
    )
    assert got.embeddings == expected.embeddings
    assert len(got.embeddings) == 2 and len(got.embeddings[0]) == 768

    await both(  # an empty chat loads the model (OllamaBrain.ready)
        fake_ollama,
        lambda: official.chat(model=MODEL, messages=[], keep_alive="10m"),
        lambda: ours.chat(model=MODEL, messages=[], keep_alive="10m"),
    )
    assert fake_ollama.chat_requests()[0]["messages"] == []


async def test_http_errors_and_error_lines_raise_the_official_response_error(
    fake_ollama: FakeOllama, ours: OllamaHTTP
) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        await ours.chat(model="not-pulled", messages=MESSAGES[:2])
    assert missing.value.status_code == 404
    assert missing.value.error == 'model "not-pulled" not found, try pulling it first'

    fake_ollama.fail_next(500, "out of memory")
    with pytest.raises(ollama.ResponseError) as failed:
        await ours.embed(model="nomic-embed-text", input=["x"])
    assert (failed.value.status_code, failed.value.error) == (500, "out of memory")

    fake_ollama.queue_reply("one two three four five")
    fake_ollama.error_stream_after(2, "the runner crashed")
    parts = []
    with pytest.raises(ollama.ResponseError) as mid:
        async for part in ours.chat_stream(model=MODEL, messages=MESSAGES[:2]):
            parts.append(part)
    assert len(parts) == 2 and mid.value.error == "the runner crashed"


async def test_transport_failures_raise_the_errors_callers_word() -> None:
    refused = ollama_client(dead_url(), read_timeout=5, connect_timeout=1)
    with pytest.raises(httpx.ConnectError):
        await refused.chat(model=MODEL, messages=MESSAGES[:2])
    await refused.close()

    async with FakeOllama(first_token_delay=2.0) as slow:
        client = ollama_client(slow.url, read_timeout=0.3, connect_timeout=1)
        with pytest.raises(httpx.ReadTimeout):
            [p async for p in client.chat_stream(model=MODEL, messages=MESSAGES[:2])]
        await client.close()

    async with FakeOllama() as cut:
        cut.queue_reply("one two three four five")
        cut.break_stream_after(2)
        client = ollama_client(cut.url, read_timeout=5, connect_timeout=1)
        with pytest.raises(httpx.RemoteProtocolError):
            [p async for p in client.chat_stream(model=MODEL, messages=MESSAGES[:2])]
        await client.close()


async def test_headers_api_key_and_a_body_that_is_not_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that answers 200 with HTML (a captive portal, a misrouted proxy) raises a
    ValueError, which callers word as "not JSON"; OLLAMA_API_KEY goes as a bearer token."""
    seen: list[dict[str, str]] = []

    async def portal(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="<html>sign in</html>", content_type="text/html")

    monkeypatch.setenv("OLLAMA_API_KEY", "sk-test-123")
    app = web.Application()
    app.router.add_post("/api/chat", portal)
    runner, port = await serve(app)
    client = ollama_client(f"http://127.0.0.1:{port}", read_timeout=5, connect_timeout=1)
    try:
        with pytest.raises(ValueError):
            await client.chat(model=MODEL, messages=MESSAGES[:2])
    finally:
        await client.close()
        await runner.cleanup()
    assert seen[0]["Authorization"] == "Bearer sk-test-123"
    assert seen[0]["Content-Type"] == "application/json"
    assert seen[0]["Accept"] == "application/json"


async def test_no_proxy_exempts_the_host(
    fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY names a proxy nobody listens at; NO_PROXY exempts the Ollama host, so the
    request goes straight to it (aiohttp's `trust_env` reading, done once per client)."""
    monkeypatch.setenv("HTTP_PROXY", dead_url())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = ollama_client(fake_ollama.url, read_timeout=5, connect_timeout=1)
    try:
        answer = await client.chat(model=MODEL, messages=MESSAGES[:2])
    finally:
        await client.close()
    assert answer.done


async def test_many_calls_at_once_each_get_their_own_answer(
    fake_ollama: FakeOllama, ours: OllamaHTTP
) -> None:
    answers = await asyncio.gather(
        *(ours.embed(model="nomic-embed-text", input=[f"text {n}"]) for n in range(50))
    )
    assert [a.embeddings[0] for a in answers] == [
        fake_ollama.embedding_for(f"text {n}") for n in range(50)
    ]


def _line(content: str, *, done: bool = False) -> bytes:
    """One line of /api/chat's stream as Ollama writes it (docs/api.md, "Chat request
    (streaming)"): the final line has `done` and the call's figures."""
    part: dict[str, Any] = {
        "model": MODEL,
        "created_at": "2026-11-30T12:00:00.000000Z",
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    if done:
        part |= {"done_reason": "stop", "total_duration": 5_000_000, "eval_count": 4}
    return (json.dumps(part) + "\n").encode()


Writes = Callable[[web.StreamResponse], Awaitable[None]]


@contextlib.asynccontextmanager
async def streaming(writes: Writes) -> AsyncIterator[tuple[OllamaHTTP, OllamaBrain]]:
    """Our client and an OllamaBrain, against a server whose /api/chat streams NDJSON as
    `writes` writes it (each `write` one piece of the body on the wire)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await writes(response)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}"
    client = ollama_client(url, read_timeout=5, connect_timeout=1)
    brain = OllamaBrain(url, read_timeout=5)
    try:
        yield client, brain
    finally:
        await client.close()
        await brain.aclose()
        await runner.cleanup()


REQUEST = ChatRequest(MODEL, MESSAGES[:2], 0.5, 7, 40, 2048)


async def test_parts_that_arrived_together_are_one_batch_and_one_chunk() -> None:
    """Lines that one network read brought are handled together: `chat_batches` gives them as
    one list and OllamaBrain joins their text into one chunk; a line cut across two reads is
    put back together; parts that come apart stay apart."""

    async def writes(response: web.StreamResponse) -> None:
        await response.write(_line("Hel") + _line("lo"))  # together
        await asyncio.sleep(0.05)
        cut = _line(" there")
        await response.write(cut[:20])  # a line cut in two
        await asyncio.sleep(0.05)
        await response.write(cut[20:])
        await asyncio.sleep(0.05)
        await response.write(_line("!") + _line("", done=True))

    async with streaming(writes) as (client, brain):
        batches = [
            [p.message.content for p in batch]
            async for batch in client.chat_batches(model=MODEL, messages=MESSAGES[:2])
        ]
        parts = [p async for p in client.chat_stream(model=MODEL, messages=MESSAGES[:2])]
        chunks = [chunk async for chunk in brain.stream(REQUEST)]
    assert batches == [["Hel", "lo"], [" there"], ["!", ""]]
    assert [p.message.content for p in parts] == ["Hel", "lo", " there", "!", ""]
    assert [c.text for c in chunks] == ["Hello", " there", "!"]
    assert chunks[-1].stats is not None and chunks[-1].stats.completion_tokens == 4
    assert [c.stats for c in chunks[:-1]] == [None, None]


async def test_a_broken_line_read_with_good_ones_comes_after_them() -> None:
    """A line that is not JSON, in the same read as good ones: the good parts come first, then
    the error, so the reply counts as started (ModelInterrupted), as when they came apart."""

    async def writes(response: web.StreamResponse) -> None:
        await response.write(_line("Hel") + _line("lo") + b"{not json\n")

    parts: list[str] = []
    chunks: list[str] = []
    async with streaming(writes) as (client, brain):
        with pytest.raises(ValueError):
            async for part in client.chat_stream(model=MODEL, messages=MESSAGES[:2]):
                parts.append(part.message.content or "")
        with pytest.raises(ModelInterrupted):
            async for chunk in brain.stream(REQUEST):
                chunks.append(chunk.text)
    assert parts == ["Hel", "lo"]
    assert chunks == ["Hello"]
