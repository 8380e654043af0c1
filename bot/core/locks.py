"""One lock per live conversation: messages in a conversation are answered in order while
conversations never wait on each other."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class ConversationLocks:
    """One lock per live conversation, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    async def __call__(self, key: tuple[str, str]) -> Held:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        await lock.acquire()
        return Held(self, key, lock)

    def release(self, key: tuple[str, str], lock: asyncio.Lock) -> None:
        lock.release()
        _, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass
class Held:
    owner: ConversationLocks
    key: tuple[str, str]
    lock: asyncio.Lock

    def release(self) -> None:
        self.owner.release(self.key, self.lock)
