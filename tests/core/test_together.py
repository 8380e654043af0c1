"""bot/core/together.py: calls made while one is out go as one send when it is back."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.together import Together


class Sender:
    """Answers each item with its double, after `gate` opens; records what each send held."""

    def __init__(self) -> None:
        self.sends: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.sends.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [item * 2 for item in items]


async def test_the_first_goes_alone_the_rest_together_in_order_within_most() -> None:
    sender = Sender()
    together: Together[int, int] = Together(sender, most=3)
    calls = [asyncio.ensure_future(together(n)) for n in range(8)]
    await asyncio.sleep(0.01)
    assert sender.sends == [[0]], "the others wait for the first"
    sender.gate.set()
    assert await asyncio.gather(*calls) == [n * 2 for n in range(8)]
    assert sender.sends == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert await together(9) == 18 and sender.sends[-1] == [9], "idle again: at once"


async def test_size_counts_an_item_as_several_and_a_big_one_goes_alone() -> None:
    sender = Sender()
    together: Together[int, int] = Together(sender, most=10, size=lambda n: n)
    calls = [asyncio.ensure_future(together(n)) for n in (1, 4, 5, 12, 3)]
    await asyncio.sleep(0)
    sender.gate.set()
    assert await asyncio.gather(*calls) == [2, 8, 10, 24, 6]
    assert sender.sends == [[1], [4, 5], [12], [3]]


async def test_a_failed_send_fails_its_callers_only_and_a_cancelled_waiter_is_left_out() -> None:
    sender = Sender()
    together: Together[int, int] = Together(sender, most=10)
    first = asyncio.ensure_future(together(1))
    await asyncio.sleep(0)
    gone, failing = asyncio.ensure_future(together(2)), asyncio.ensure_future(together(3))
    await asyncio.sleep(0)
    gone.cancel()
    sender.fail = RuntimeError("down")
    sender.gate.set()
    with pytest.raises(RuntimeError):
        await first
    with pytest.raises(RuntimeError):
        await failing
    assert sender.sends == [[1], [3]]
    sender.fail = None
    assert await together(4) == 8


async def test_closing_cancels_the_sends_under_way() -> None:
    sender = Sender()
    together: Together[int, int] = Together(sender, most=10)
    first = asyncio.ensure_future(together(1))
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(together(2))
    await asyncio.sleep(0)
    first.cancel()  # the first caller gives up: the waiting one goes on its own send
    await asyncio.sleep(0.01)
    assert sender.sends == [[1], [2]]
    await together.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_after_closing_nothing_more_is_sent_and_those_waiting_are_cancelled() -> None:
    sender = Sender()
    together: Together[int, int] = Together(sender, most=1)
    first = asyncio.ensure_future(together(1))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(together(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    await together.aclose()
    sender.gate.set()
    assert await first == 2, "the send under way in the caller's own task ends as it would"
    for call in waiting:
        with pytest.raises(asyncio.CancelledError):
            await call
    assert sender.sends == [[1]]


async def test_a_call_that_goes_alone_takes_the_one_item_path_where_given() -> None:
    sender = Sender()
    lone: list[int] = []

    async def alone(item: int) -> int:
        lone.append(item)
        await sender.gate.wait()
        return -item

    together: Together[int, int] = Together(sender, most=2, alone=alone)
    calls = [asyncio.ensure_future(together(n)) for n in (1, 2, 3, 4)]
    await asyncio.sleep(0)
    sender.gate.set()
    # 1 alone; 2 and 3 together; 4, the only one left, alone again
    assert await asyncio.gather(*calls) == [-1, 4, 6, -4]
    assert lone == [1, 4] and sender.sends == [[2, 3]]


async def test_with_retry_alone_a_failed_send_is_sent_item_by_item() -> None:
    """A write of several that fails (one bad row) is written again one by one: only the bad
    item's caller fails, the others get their answers, and a caller that gave up meanwhile
    is written all the same."""
    sender = Sender()
    lone: list[int] = []

    async def alone(item: int) -> int:
        lone.append(item)
        await sender.gate.wait()
        if item == 13:
            raise ValueError("a bad row")
        return -item

    together: Together[int, int] = Together(sender, most=10, alone=alone, retry_alone="items")
    first = asyncio.ensure_future(together(1))
    await asyncio.sleep(0)
    calls = [asyncio.ensure_future(together(n)) for n in (12, 13, 14, 15)]
    await asyncio.sleep(0)
    sender.fail = RuntimeError("one of them is bad")
    sender.gate.set()
    assert await first == -1
    gone = calls.pop()  # gives up once the send is out: its item is still written
    gone.cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == -12 and results[2] == -14
    assert isinstance(results[1], ValueError)
    assert sender.sends == [[12, 13, 14, 15]]
    assert lone == [1, 12, 13, 14, 15]


def test_retry_alone_needs_the_one_item_path() -> None:
    with pytest.raises(ValueError):
        Together(Sender(), most=2, retry_alone="items")
