"""The event loop the bot's long-running commands run on: uvloop's (libuv), where installed.

Much of the bot's CPU is the event loop's own work around asyncpg's round trips and the HTTP
clients (docs/benchmarks.md). uvloop is libuv under the same asyncio API; on the pipeline bench
its gain was within the noise of one pair, and it is what the bot and its tests run on
(tests/conftest.py), so there is one loop to trust. Where uvloop is not installed (it has no
Windows build), the standard loop runs everything the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop factory, or the standard one where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory()` gives."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
