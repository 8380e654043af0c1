"""Admin notices: alerts that should reach a human (guard blocks, budget warnings, summaries).

Adapters register a sink (an admin channel on Discord, an admin room on Matrix); with none
registered, notices go to the log at WARNING. Services call `AdminNotifier.send()` and never
know which platform delivers it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Sink = Callable[[str], Awaitable[None]]


class AdminNotifier:
    def __init__(self) -> None:
        self._sinks: dict[str, Sink] = {}

    def register(self, name: str, sink: Sink) -> None:
        self._sinks[name] = sink

    def unregister(self, name: str) -> None:
        self._sinks.pop(name, None)

    async def send(self, text: str) -> int:
        """Deliver to every sink; returns how many took it. Failures are logged, not raised."""
        log.warning("admin notice: %s", text)
        delivered = 0
        for name, sink in list(self._sinks.items()):
            try:
                await sink(text)
                delivered += 1
            except Exception:
                log.exception("admin notice sink %s failed", name)
        return delivered
