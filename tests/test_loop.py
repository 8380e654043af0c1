"""The bot's commands and the tests run on one event loop: uvloop's (bot/loop.py)."""

from __future__ import annotations

import asyncio
import gc

import uvloop

from bot.loop import GC_THRESHOLD, run


def test_the_long_running_commands_run_on_uvloop() -> None:
    async def which() -> type:
        return type(asyncio.get_running_loop())

    assert run(which()) is uvloop.Loop


async def test_the_tests_run_on_the_loop_production_runs_on() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


def test_the_garbage_collector_runs_less_often_while_the_bot_runs() -> None:
    """Python's default starts a collection every 700 new objects; the bot's loop raises it
    (bot/loop.py) and puts it back when the loop ends."""
    before = gc.get_threshold()

    async def threshold() -> tuple[int, ...]:
        return gc.get_threshold()

    assert run(threshold()) == GC_THRESHOLD
    assert GC_THRESHOLD[0] > before[0]
    assert gc.get_threshold() == before
