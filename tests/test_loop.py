"""The bot's commands and the tests run on one event loop: uvloop's (bot/loop.py)."""

from __future__ import annotations

import asyncio

import uvloop

from bot.loop import run


def test_the_long_running_commands_run_on_uvloop() -> None:
    async def which() -> type:
        return type(asyncio.get_running_loop())

    assert run(which()) is uvloop.Loop


async def test_the_tests_run_on_the_loop_production_runs_on() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
