"""The degrade ladder asked ahead (`BrainRouter.level_check`): the engine asks it before recall
and hands it to `open`, which then uses that step and does not ask again; a check that no
request awaits ends quietly. Real parts: a backend pool over the fake Ollama on loopback."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from bot.brains.build import build_pool
from bot.brains.router import BrainRouter, NoBackend
from tests.brains.test_backends import pool_settings, request
from tests.fakes.ollama import FakeOllama


class Ladder:
    """A degrade ladder at a step the test sets, counting how often it is asked."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.asked: list[str | None] = []

    async def __call__(self, persona: str | None) -> int:
        self.asked.append(persona)
        await asyncio.sleep(0.01)  # a round trip to the ledger's totals
        return self.step


async def test_open_uses_the_step_asked_ahead_and_does_not_ask_again(
    tmp_path: Path, database_url: str
) -> None:
    async with FakeOllama() as ollama:
        settings = pool_settings(tmp_path, database_url, [{"name": "box", "url": ollama.url}])
        ladder = Ladder(2)  # the local model only: the pool's backend is not to be used
        router = BrainRouter([], build_pool(settings), degrade=ladder)
        try:
            level = router.level_check("mimi")
            assert level is not None
            try:
                await router.open(request(), persona="mimi", level=level)
            except NoBackend:
                pass
            else:
                raise AssertionError("a backend of the pool answered at step 2")
            assert ladder.asked == ["mimi"] and ollama.chat_requests() == []

            ladder.step = 0  # asked now, in open, when nothing was asked ahead
            ollama.queue_reply("hello")
            answer = await router.open(request(), persona="mimi")
            assert "".join([part async for part in answer.chunks()]) == "hello"
            assert ladder.asked == ["mimi", "mimi"]
        finally:
            await router.aclose()


async def test_a_check_no_request_awaits_ends_quietly() -> None:
    """The input refused, or the prompt failed: the check runs to its end (it may be sending
    the admins an alert), and its failure is not reported as never retrieved."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))

    async def broken(persona: str | None) -> int:
        raise ConnectionError("the database went away")

    router = BrainRouter([], degrade=broken)
    level = router.level_check("mimi")
    assert level is not None
    await asyncio.sleep(0.01)
    assert level.done() and not level.cancelled()  # (not asking it its exception)
    del level
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(handler)
    assert seen == []
    assert BrainRouter([]).level_check("mimi") is None  # no ladder, nothing to ask
