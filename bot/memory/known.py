"""Which embedding models a user's memories have, remembered between messages (issue 22).

Recall asks the database this before every message (`MemoryStore.models_of`): nothing there,
no embedding call. Once a user has memories the answer rarely changes, so a yes is kept for
`ttl` seconds and recall goes straight to the embedding; a no is never kept, so a user's first
memories are recalled at the next message.

What this process writes (facts learned, forgotten, moved to another model) drops the user's
answers at once, and an answer read while this process wrote memories is not kept (it may
predate the write). A write by another process sharing the database (a second replica, `bot chat`
beside `bot run`) is seen within `ttl`; until then recall may embed for a user whose memories
are gone (it finds nothing). When the embedding comes from a model the kept answer does not
name (Ollama down, the local model answering; memories moved by `memories reembed`), recall
asks the database again before it gives up.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class KnownModels:
    def __init__(
        self,
        *,
        ttl: float = 60.0,
        size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.size = size  # users kept at most (the least recently asked go first)
        self._clock = clock
        # user key -> scope (None: all) -> (models, kept until)
        self._kept: OrderedDict[str, dict[str | None, tuple[list[str], float]]] = OrderedDict()
        self._writes = 0  # memories written here so far

    def get(self, user_key: str, scope: str | None) -> list[str] | None:
        """The models kept for the user in `scope`; None: ask the database."""
        kept = self._kept.get(user_key, {}).get(scope)
        if kept is None:
            return None
        models, until = kept
        if self._clock() >= until:
            del self._kept[user_key][scope]
            return None
        self._kept.move_to_end(user_key)
        return models

    def version(self) -> int:
        """Read before asking the database; `put` keeps the answer only if it is unchanged."""
        return self._writes

    def put(self, user_key: str, scope: str | None, models: list[str], version: int) -> None:
        if not models or version != self._writes:
            return  # no memories (not kept), or memories written since it was read
        self._kept.setdefault(user_key, {})[scope] = (models, self._clock() + self.ttl)
        self._kept.move_to_end(user_key)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def forget(self, user_key: str | None = None) -> None:
        """Memories changed here (the user's; None: of users not known here, as when a
        deleted message takes facts with it or all are re-embedded): ask the database again."""
        self._writes += 1
        if user_key is None:
            self._kept.clear()
        else:
            self._kept.pop(user_key, None)
