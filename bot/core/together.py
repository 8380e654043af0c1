"""Calls made while one is on its way, sent together when it is back ("natural batching").

The first call goes at once, alone: a quiet bot waits for nothing. Calls made while a request
is out wait; when it comes back, those waiting (up to `most`, counted by `size`, in the order
made) go as one request, and each caller gets its own answer. Under a burst of replies this is
one round trip for many of them instead of one each; the batches grow with the load and need no
timer. Used for the memory's embeddings (one /api/embed call for many messages) and for which
embedding models users' memories have (one query for many users).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


def _counted_once(_item: object) -> int:
    return 1


class Together(Generic[In, Out]):
    """`await together(item)`: `send([item, …])` answers each item, in order. A call that goes
    alone (the first, or the only one that waited) goes through `alone(item)` where one is given:
    a statement for one key is planned and run faster than the batch's for a list of one. A
    failed send fails every caller in it (each decides what to do, as it would alone); a caller
    that gave up while it waited is left out of the next send. With `retry_alone` (what the
    items are, for the log) a failed send of several is sent again item by item through
    `alone`, so that each caller gets its own answer or error: for writes, where one bad row
    must not fail the others."""

    def __init__(
        self,
        send: Callable[[list[In]], Awaitable[list[Out]]],
        *,
        most: int,
        size: Callable[[In], int] = _counted_once,
        alone: Callable[[In], Awaitable[Out]] | None = None,
        retry_alone: str | None = None,
    ) -> None:
        if retry_alone is not None and alone is None:
            raise ValueError("retry_alone needs alone")
        self._send = send
        self._retry_alone = retry_alone
        self._alone = alone
        self._most = most
        self._size = size
        self._busy = False
        self._waiting: deque[tuple[In, asyncio.Future[Out]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def __call__(self, item: In) -> Out:
        if not self._busy:
            self._busy = True
            try:
                [answer] = await self._send_all([item])
                return answer
            finally:
                self._next()
        waiter: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, waiter))
        return await waiter

    async def _send_all(self, items: list[In]) -> list[Out]:
        if len(items) == 1 and self._alone is not None:
            return [await self._alone(items[0])]
        return await self._send(items)

    def _next(self) -> None:
        """Send what waits, as one; or be idle (closed: what waits is cancelled)."""
        if self._closed:
            for _, waiter in self._waiting:
                waiter.cancel()
            self._waiting.clear()
            self._busy = False
            return
        taken: list[tuple[In, asyncio.Future[Out]]] = []
        count = 0
        while self._waiting and (
            not taken or count + self._size(self._waiting[0][0]) <= self._most
        ):
            item, waiter = self._waiting.popleft()
            if not waiter.done():  # a caller cancelled while it waited is left out
                taken.append((item, waiter))
                count += self._size(item)
        if not taken:
            self._busy = False
            return
        task = asyncio.get_running_loop().create_task(self._send_for(taken))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_for(self, taken: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            answers = await self._send_all([item for item, _ in taken])
        except asyncio.CancelledError:  # closing
            for _, waiter in taken:
                waiter.cancel()
            raise
        except Exception as exc:
            if self._retry_alone is not None and len(taken) > 1:
                log.warning("%d %s sent together failed; one by one", len(taken), self._retry_alone)
                await self._each_alone(taken)
                return
            for _, waiter in taken:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for (_, waiter), answer in zip(taken, answers, strict=True):
                if not waiter.done():
                    waiter.set_result(answer)
        finally:
            self._next()

    async def _each_alone(self, taken: list[tuple[In, asyncio.Future[Out]]]) -> None:
        assert self._alone is not None
        for item, waiter in taken:  # a caller that gave up meanwhile is written all the same
            try:
                answer = await self._alone(item)
            except Exception as exc:
                if not waiter.done():
                    waiter.set_exception(exc)
            else:
                if not waiter.done():
                    waiter.set_result(answer)

    async def aclose(self) -> None:
        """Stop the sends under way and send nothing more; their callers, and those waiting,
        are cancelled (a first call's own send, in its caller's task, ends as it would)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
