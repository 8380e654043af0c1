"""Embedding calls made while one is on its way go together as one /api/embed request
(`bot/memory/embeddings.py`, `Together`), against the fake Ollama over loopback through the
bot's own client. Ollama's /api/embed takes a list of inputs and answers their vectors in the
same order, with one `prompt_eval_count` for them all (docs/api.md, "Generate Embeddings")."""

from __future__ import annotations

import asyncio

import pytest

from bot.errors import ModelUnavailable
from bot.memory.embeddings import OllamaEmbedder
from tests.fakes.ollama import FakeOllama

MODEL = "nomic-embed-text"


def inputs(fake: FakeOllama) -> list[list[str]]:
    return [body["input"] for body in fake.embed_requests()]


async def test_calls_made_while_one_is_out_go_together_each_with_its_own_vectors(
    fake_ollama: FakeOllama,
) -> None:
    embedder = OllamaEmbedder(fake_ollama.url, MODEL)
    try:
        texts = [f"message {n}" for n in range(10)]
        answers = await asyncio.gather(*(embedder.embed([t]) for t in texts))
        assert inputs(fake_ollama) == [texts[:1], texts[1:]]  # the first at once, then the rest
        for text, answer in zip(texts, answers, strict=True):
            assert answer.vectors == [fake_ollama.embedding_for(text)]
            assert answer.model == f"ollama:{MODEL}" and answer.tokens and answer.tokens > 0
        counted = sum(len(t.split()) + 2 for t in texts[1:])  # the fake's count for the batch
        assert sum(a.tokens or 0 for a in answers[1:]) == counted  # shared out, none lost

        lone = await embedder.embed(["on its own"])  # nothing out: it goes at once, alone
        assert inputs(fake_ollama)[-1] == ["on its own"]
        assert lone.vectors == [fake_ollama.embedding_for("on its own")]
    finally:
        await embedder.aclose()


async def test_a_batch_holds_at_most_its_size_and_never_splits_a_call(
    fake_ollama: FakeOllama,
) -> None:
    embedder = OllamaEmbedder(fake_ollama.url, MODEL, batch=25)
    try:
        calls = [[f"fact {c}.{n}" for n in range(10)] for c in range(6)]
        answers = await asyncio.gather(*(embedder.embed(texts) for texts in calls))
        sent = inputs(fake_ollama)
        assert sent == [calls[0], calls[1] + calls[2], calls[3] + calls[4], calls[5]]
        for texts, answer in zip(calls, answers, strict=True):
            assert answer.vectors == [fake_ollama.embedding_for(t) for t in texts]
    finally:
        await embedder.aclose()


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_call_works(
    fake_ollama: FakeOllama,
) -> None:
    embedder = OllamaEmbedder(fake_ollama.url, MODEL)
    try:
        fake_ollama.fail_next(500, "out of memory", count=2)  # the first call, then the batch
        calls = [asyncio.ensure_future(embedder.embed([f"w{n}"])) for n in range(4)]
        for call in calls:
            with pytest.raises(ModelUnavailable, match="HTTP 500"):
                await call
        assert inputs(fake_ollama) == [["w0"], ["w1", "w2", "w3"]]
        after = await embedder.embed(["after"])
        assert after.vectors == [fake_ollama.embedding_for("after")]
    finally:
        await embedder.aclose()


async def test_a_caller_that_gave_up_while_waiting_is_left_out(fake_ollama: FakeOllama) -> None:
    embedder = OllamaEmbedder(fake_ollama.url, MODEL)
    try:
        first = asyncio.ensure_future(embedder.embed(["first"]))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(embedder.embed(["gone"]))
        kept = asyncio.ensure_future(embedder.embed(["kept"]))
        await asyncio.sleep(0)
        gone.cancel()
        await first
        assert (await kept).vectors == [fake_ollama.embedding_for("kept")]
        assert inputs(fake_ollama) == [["first"], ["kept"]]
    finally:
        await embedder.aclose()
