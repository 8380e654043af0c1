"""`Quiet` (bot/core/background.py): work that can wait waits for a moment without replies,
for its patience at most, and a drain lets it go at once."""

from __future__ import annotations

import asyncio
import time

from bot.core.background import Quiet


async def waited(quiet: Quiet, patience: float) -> float:
    started = time.monotonic()
    await quiet.wait(patience)
    return time.monotonic() - started


async def test_with_no_reply_in_flight_it_waits_the_settling_time_only() -> None:
    quiet = Quiet(settle=0.1)
    took = await waited(quiet, 10)
    assert 0.09 <= took < 1


async def test_a_reply_in_flight_holds_it_until_the_reply_ends_and_settles() -> None:
    quiet = Quiet(settle=0.1)
    with quiet.busy():
        waiting = [asyncio.create_task(waited(quiet, 10)) for _ in range(100)]
        await asyncio.sleep(0.4)
        assert not any(task.done() for task in waiting)
        ended = time.monotonic()
    took = await asyncio.gather(*waiting)
    assert all(t >= 0.4 for t in took)
    assert 0.09 <= time.monotonic() - ended < 1


async def test_each_new_reply_restarts_the_settling_time() -> None:
    quiet = Quiet(settle=0.5)
    waiting = asyncio.create_task(waited(quiet, 10))
    for _ in range(4):  # replies 0.1 s apart: never 0.5 s of quiet
        with quiet.busy():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        assert not waiting.done()
    assert await waiting >= 0.5 + 0.45  # the last reply ended at 0.5 s, then settled


async def test_replies_that_never_stop_hold_it_for_its_patience_only() -> None:
    quiet = Quiet(settle=0.1)
    with quiet.busy():
        took = await waited(quiet, 0.3)
    assert 0.29 <= took < 1


async def test_a_drain_lets_every_waiter_go_at_once_and_nothing_waits_during_it() -> None:
    quiet = Quiet(settle=5)
    with quiet.busy():
        waiting = [asyncio.create_task(waited(quiet, 30)) for _ in range(10)]
        await asyncio.sleep(0.05)
        with quiet.flushing():
            took = await asyncio.wait_for(asyncio.gather(*waiting), 1)
            assert await asyncio.wait_for(waited(quiet, 30), 1) < 0.1
    assert all(t < 1 for t in took)


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    quiet = Quiet(settle=5)
    with quiet.busy():
        task = asyncio.create_task(quiet.wait(30))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        other = asyncio.create_task(waited(quiet, 30))
        await asyncio.sleep(0.01)
        with quiet.flushing():
            assert await asyncio.wait_for(other, 1) < 1
