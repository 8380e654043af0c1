"""The event loop the bot's long-running commands run on: uvloop's (libuv), where installed.

Much of the bot's CPU is the event loop's own work around asyncpg's round trips and the HTTP
clients (docs/benchmarks.md). uvloop is libuv under the same asyncio API; on the pipeline bench
its gain was within the noise of one pair, and it is what the bot and its tests run on
(tests/conftest.py), so there is one loop to trust. Where uvloop is not installed (it has no
Windows build), the standard loop runs everything the same way.

The cyclic garbage collector runs less often than Python's default while the loop runs
(`GC_THRESHOLD`): by default a young-generation collection starts every 700 new container
objects, and with hundreds of replies in flight each one walks every young object they hold; at
1,000 replies in flight that was 0.47 s of the bot's ~3.4 s of CPU (200 collections), and
0.13 s (15 collections of about 8 ms) with a threshold of 10,000 (docs/benchmarks.md). Nearly
every object is freed by reference counting as before; only garbage in reference cycles waits a
little longer for its collection.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

GC_THRESHOLD = (10_000, 10, 10)  # Python's default: (700, 10, 10)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop factory, or the standard one where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory()` gives, the garbage collector at
    `GC_THRESHOLD` meanwhile."""
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(main)
    finally:
        gc.set_threshold(*before)
