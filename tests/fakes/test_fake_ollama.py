"""The loopback FakeOllama speaks Ollama's wire protocol, as seen by the official client."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import re
import select
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import ollama
import pytest
from pydantic import BaseModel

from tests.fakes.loopback import listen_backlog
from tests.fakes.ollama import FakeOllama, _go_float32, split_into_chunks

CHAT_MODEL = "llama3.2:3b"
EMBED_MODEL = "nomic-embed-text"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=fake.url) as ollama_client:
        yield ollama_client


async def _collect(stream: AsyncIterator[ollama.ChatResponse]) -> list[ollama.ChatResponse]:
    return [part async for part in stream]


async def test_url_is_loopback_with_os_chosen_port(fake: FakeOllama) -> None:
    assert fake.url.startswith("http://127.0.0.1:")
    assert int(fake.url.rsplit(":", 1)[1]) > 0


async def test_streamed_chat_joins_to_queued_text_and_reports_stats(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    text = "Well, hello there!  How are you\ntoday?"
    fake.queue_reply(text)

    parts = await _collect(await client.chat(model=CHAT_MODEL, messages=HELLO, stream=True))

    *deltas, final = parts
    assert len(deltas) == len(split_into_chunks(text)) > 1
    assert "".join(p.message.content or "" for p in deltas) == text
    assert all(p.done is False and p.model == CHAT_MODEL for p in deltas)
    assert all(p.message.role == "assistant" and p.created_at for p in parts)
    assert final.done is True
    assert final.done_reason == "stop"
    assert final.message.content == ""
    assert final.eval_count == len(deltas)
    assert final.prompt_eval_count is not None and final.prompt_eval_count > 0
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        value = getattr(final, field)
        assert isinstance(value, int) and value > 0, field
    assert final.total_duration is not None
    assert final.total_duration > final.load_duration + final.eval_duration  # type: ignore[operator]
    body = fake.chat_requests()[0]
    assert body["model"] == CHAT_MODEL
    assert body["stream"] is True
    assert body["messages"] == HELLO


async def test_streamed_chat_uses_explicit_chunks(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.queue_reply("abcdef", chunks=["ab", "cd", "ef"])
    parts = await _collect(await client.chat(model=CHAT_MODEL, messages=HELLO, stream=True))
    assert [p.message.content for p in parts[:-1]] == ["ab", "cd", "ef"]
    with pytest.raises(ValueError):
        fake.queue_reply("abc", chunks=["a", "b"])


async def test_replies_are_fifo_then_fall_back_to_responder(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.queue_reply("first")
    fake.queue_reply("second")
    replies = [
        (await client.chat(model=CHAT_MODEL, messages=HELLO)).message.content for _ in range(3)
    ]
    assert replies == ["first", "second", "echo: hello there"]

    fake.responder = lambda body: f"{len(body['messages'])} messages"
    reply = await client.chat(model=CHAT_MODEL, messages=HELLO)
    assert reply.message.content == "1 messages"


async def test_non_streamed_chat(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    response = await client.chat(
        model=CHAT_MODEL,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "ping"},
        ],
        options={"temperature": 0.2},
    )
    assert isinstance(response, ollama.ChatResponse)
    assert response.message.role == "assistant"
    assert response.message.content == "echo: ping"
    assert response.done is True
    assert response.done_reason == "stop"
    assert response.eval_count == 2
    assert response.prompt_eval_count is not None and response.prompt_eval_count > 0
    assert response.total_duration is not None and response.total_duration > 0
    (body,) = fake.chat_requests()
    assert body["stream"] is False
    assert body["options"] == {"temperature": 0.2}
    assert fake.requests == [("/api/chat", body)]


async def test_num_predict_truncates_with_done_reason_length(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.queue_reply("one two three four five")
    response = await client.chat(model=CHAT_MODEL, messages=HELLO, options={"num_predict": 2})
    assert response.message.content == "one two"
    assert response.done_reason == "length"
    assert response.eval_count == 2


async def test_chat_without_messages_just_loads_the_model(client: ollama.AsyncClient) -> None:
    response = await client.chat(model=CHAT_MODEL, messages=[])
    assert response.done is True
    assert response.done_reason == "load"
    assert response.message.content == ""


class Verdict(BaseModel):
    safe: bool
    category: str
    score: int


async def test_format_is_honoured(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    # A queued reply is used verbatim as the content.
    fake.queue_reply('{"safe": true, "category": "none", "score": 3}')
    queued = await client.chat(model=CHAT_MODEL, messages=HELLO, format=Verdict.model_json_schema())
    assert Verdict.model_validate_json(queued.message.content or "") == Verdict(
        safe=True, category="none", score=3
    )
    assert fake.chat_requests()[0]["format"] == Verdict.model_json_schema()

    # Without a queued reply the answer still conforms to the schema / is JSON.
    generated = await client.chat(
        model=CHAT_MODEL, messages=HELLO, format=Verdict.model_json_schema()
    )
    Verdict.model_validate_json(generated.message.content or "")
    as_json = await client.chat(model=CHAT_MODEL, messages=HELLO, format="json", stream=True)
    parts = await _collect(as_json)
    assert json.loads("".join(p.message.content or "" for p in parts)) == {
        "response": "echo: hello there"
    }


async def test_embed_is_deterministic_unit_length(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    single = await client.embed(model=EMBED_MODEL, input="hello")
    assert isinstance(single, ollama.EmbedResponse)
    assert single.model == EMBED_MODEL
    assert len(single.embeddings) == 1
    assert len(single.embeddings[0]) == 768
    assert math.isclose(math.fsum(v * v for v in single.embeddings[0]), 1.0, rel_tol=1e-6)
    assert single.prompt_eval_count is not None and single.prompt_eval_count > 0
    assert single.total_duration is not None and single.load_duration is not None

    batch = await client.embed(model=EMBED_MODEL, input=["hello", "world", "hello"])
    first, second, third = (list(v) for v in batch.embeddings)
    assert first == list(single.embeddings[0]) == third
    assert first != second
    assert first == fake.embedding_for("hello")
    assert fake.embed_requests()[1]["input"] == ["hello", "world", "hello"]

    # Same text, another server instance: same vector.
    async with FakeOllama(embed_dim=16) as other, ollama.AsyncClient(host=other.url) as small:
        first_run = await small.embed(model=EMBED_MODEL, input="hello")
        assert len(first_run.embeddings[0]) == 16
        second_run = await small.embed(model=EMBED_MODEL, input="hello")
        assert first_run.embeddings == second_run.embeddings
    assert list(first_run.embeddings[0]) == FakeOllama(embed_dim=16).embedding_for("hello")


async def test_embeddings_go_on_the_wire_as_go_writes_float32(fake: FakeOllama) -> None:
    """Ollama's EmbedResponse is `[][]float32` (api/types.go): each number is the shortest
    decimal that reads back as the same float32, as Go's encoding/json writes it."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake.url}/api/embed", json={"model": EMBED_MODEL, "input": "hello"}
        ) as response,
    ):
        raw = await response.text()
        assert response.content_type == "application/json"
    assert list(json.loads(raw)) == [
        "model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"
    ]  # fmt: skip
    words = re.search(r'"embeddings":\[\[([^\]]*)\]\]', raw).group(1).split(",")  # type: ignore[union-attr]
    assert len(words) == 768
    for word in words:
        single = struct.unpack("<f", struct.pack("<f", float(word)))[0]
        digits = len(word.lstrip("-0.").replace(".", "").split("e")[0])
        assert digits <= 9 and "e" not in word  # values of a unit vector: plain
        shorter = f"{single:.{max(digits - 1, 1)}g}"
        assert digits == 1 or struct.unpack("<f", struct.pack("<f", float(shorter)))[0] != single
    assert [float(w) for w in words] == fake.embedding_for("hello")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (0.1, "0.1"),
        (1 / 3, "0.33333334"),
        (-0.0123456789, "-0.012345679"),
        (123456789.0, "123456790"),
        (1.0, "1"),
        (0.0, "0"),
        (1.5e-7, "1.5e-7"),
        (1e21, "1e+21"),
    ],
)
def test_float32_written_as_go_writes_it(value: float, written: str) -> None:
    assert _go_float32(value) == written


async def test_embed_dimensions_truncates_and_renormalises(client: ollama.AsyncClient) -> None:
    response = await client.embed(model=EMBED_MODEL, input="hello", dimensions=64)
    vector = response.embeddings[0]
    assert len(vector) == 64
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-6)


async def test_list_show_ps_and_version(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    listed = await client.list()
    names = [m.model for m in listed.models]
    # Like real Ollama, untagged names are listed as ":latest".
    assert names == ["llama3.2:3b", "llama-guard3:1b", "nomic-embed-text:latest"]
    llama = listed.models[0]
    assert llama.details is not None and llama.details.family == "llama"
    assert llama.size is not None and llama.size > 1_000_000_000
    assert llama.digest is not None and len(llama.digest) == 64
    assert llama.modified_at is not None

    fake.models.append("qwen2.5:0.5b")
    assert "qwen2.5:0.5b" in [m.model for m in (await client.list()).models]
    fake.queue_reply("hi")
    assert (await client.chat(model="qwen2.5:0.5b", messages=HELLO)).message.content == "hi"

    shown = await client.show(CHAT_MODEL)
    assert shown.details is not None and shown.details.parameter_size == "3.2B"
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 131_072
    embed_caps = (await client.show(EMBED_MODEL)).capabilities
    assert embed_caps == ["embedding"]
    with pytest.raises(ollama.ResponseError) as excinfo:
        await client.show("missing:7b")
    assert excinfo.value.status_code == 404

    running = await client.ps()
    assert [m.model for m in running.models] == ["qwen2.5:0.5b"]

    async with httpx.AsyncClient(base_url=fake.url) as raw:
        version = (await raw.get("/api/version")).json()
        assert isinstance(version["version"], str) and version["version"]
        assert (await raw.get("/")).text == "Ollama is running"


async def test_unknown_model_is_404(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as excinfo:
        await client.chat(model="mystery:70b", messages=HELLO)
    assert excinfo.value.status_code == 404
    assert excinfo.value.error == 'model "mystery:70b" not found, try pulling it first'

    stream = await client.chat(model="mystery:70b", messages=HELLO, stream=True)
    with pytest.raises(ollama.ResponseError) as excinfo:
        await _collect(stream)
    assert excinfo.value.status_code == 404

    with pytest.raises(ollama.ResponseError) as excinfo:
        await client.embed(model="mystery-embed", input="x")
    assert excinfo.value.status_code == 404

    fake.models.remove(CHAT_MODEL)
    with pytest.raises(ollama.ResponseError) as excinfo:
        await client.chat(model=CHAT_MODEL, messages=HELLO)
    assert excinfo.value.status_code == 404


async def test_embedding_model_does_not_chat(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as excinfo:
        await client.chat(model=EMBED_MODEL, messages=HELLO)
    assert excinfo.value.status_code == 400
    assert excinfo.value.error == f'"{EMBED_MODEL}" does not support chat'


async def test_fail_next(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.fail_next()
    with pytest.raises(ollama.ResponseError) as excinfo:
        await client.chat(model=CHAT_MODEL, messages=HELLO)
    assert excinfo.value.status_code == 500
    assert excinfo.value.error == "boom"
    assert (await client.chat(model=CHAT_MODEL, messages=HELLO)).message.content

    fake.fail_next(503, "overloaded", count=2)
    with pytest.raises(ollama.ResponseError) as excinfo:
        await _collect(await client.chat(model=CHAT_MODEL, messages=HELLO, stream=True))
    assert (excinfo.value.status_code, excinfo.value.error) == (503, "overloaded")
    with pytest.raises(ollama.ResponseError) as excinfo:
        await client.embed(model=EMBED_MODEL, input="x")
    assert excinfo.value.status_code == 503
    assert (await client.embed(model=EMBED_MODEL, input="x")).embeddings
    assert len(fake.chat_requests()) == 3  # failed requests are recorded too


async def test_broken_stream_raises_remote_protocol_error(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.queue_reply("one two three four five")
    fake.break_stream_after(2)
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        async for part in await client.chat(model=CHAT_MODEL, messages=HELLO, stream=True):
            received.append(part.message.content or "")
    assert received == ["one", " two"]

    # Only the next stream breaks.
    fake.queue_reply("all good")
    parts = await _collect(await client.chat(model=CHAT_MODEL, messages=HELLO, stream=True))
    assert parts[-1].done is True


async def test_error_line_mid_stream_raises_response_error(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.queue_reply("one two three")
    fake.error_stream_after(1, "model runner crashed")
    received: list[str] = []
    with pytest.raises(ollama.ResponseError, match="model runner crashed"):
        async for part in await client.chat(model=CHAT_MODEL, messages=HELLO, stream=True):
            received.append(part.message.content or "")
    assert received == ["one"]


@pytest.mark.parametrize("stream", [False, True])
async def test_hang_times_out(stream: bool) -> None:
    async with (
        FakeOllama() as fake,
        ollama.AsyncClient(host=fake.url, timeout=httpx.Timeout(0.3)) as client,
    ):
        fake.hang = True
        fake.queue_reply("kept for later")
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            result = await client.chat(model=CHAT_MODEL, messages=HELLO, stream=stream)
            if not isinstance(result, ollama.ChatResponse):
                await _collect(result)
        assert time.monotonic() - started < 2
        assert fake.active == 1

        # Releasing the hang does not hand the abandoned request the queued reply.
        fake.hang = False
        for _ in range(100):
            if fake.active == 0:
                break
            await asyncio.sleep(0.01)
        assert fake.active == 0
        assert fake.pending_replies == 1
        reply = await client.chat(model=CHAT_MODEL, messages=HELLO)
        assert reply.message.content == "kept for later"


async def test_stop_releases_hanging_requests() -> None:
    fake = FakeOllama()
    await fake.start()
    fake.hang = True
    async with ollama.AsyncClient(host=fake.url) as client:
        task = asyncio.create_task(client.chat(model=CHAT_MODEL, messages=HELLO))
        for _ in range(100):
            if fake.active:
                break
            await asyncio.sleep(0.01)
        assert fake.active == 1
        started = time.monotonic()
        await fake.stop()
        assert time.monotonic() - started < 1.5
        with pytest.raises(ollama.ResponseError) as excinfo:
            await task
        assert excinfo.value.status_code == 503


async def test_max_active_counts_concurrent_streams(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.token_delay = 0.05
    fake.first_token_delay = 0.05
    for _ in range(3):
        fake.queue_reply("a slow stream of words")

    async def one() -> str:
        parts = await _collect(await client.chat(model=CHAT_MODEL, messages=HELLO, stream=True))
        return "".join(p.message.content or "" for p in parts)

    assert fake.max_active == 0
    started = time.monotonic()
    results = await asyncio.gather(one(), one(), one())
    elapsed = time.monotonic() - started
    assert list(results) == ["a slow stream of words"] * 3
    assert fake.max_active == 3
    assert fake.active == 0
    assert 0.2 <= elapsed < 1.0  # 0.05 + 4 * 0.05 per stream, run concurrently


async def test_requests_memory_records_everything(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    await client.list()
    await client.embed(model=EMBED_MODEL, input="a")
    await client.chat(model=CHAT_MODEL, messages=HELLO)
    paths = [path for path, _ in fake.requests]
    assert paths == ["/api/tags", "/api/embed", "/api/chat"]
    body: dict[str, Any] = fake.requests[1][1]
    assert body == {"model": EMBED_MODEL, "input": "a"}
    fake.reset()
    assert fake.requests == []


async def test_a_burst_of_connections_waits_in_the_accept_queue(fake: FakeOllama) -> None:
    """Ollama (Go) listens with the system's somaxconn; the fake too, not aiohttp's 128: 600
    connections opened while the server's loop is busy all finish their handshake in the
    kernel, none has its SYN dropped (and sent again a second later)."""
    if listen_backlog() < 600:
        pytest.skip("this kernel caps every server's accept queue below the burst (somaxconn)")
    port = int(fake.url.rsplit(":", 1)[1])
    sockets = [socket.socket() for _ in range(600)]
    try:
        for sock in sockets:  # the loop is held here: the fake accepts none of them yet
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        deadline = time.monotonic() + 0.5
        pending = list(sockets)
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 0.05)
            pending = [s for s in pending if s not in writable]
        assert not pending, f"{len(pending)} of 600 connections not established"
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in sockets)
    finally:
        for sock in sockets:
            sock.close()
