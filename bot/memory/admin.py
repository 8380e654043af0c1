"""`python -m bot memories reembed|export --user KEY [--persona NAME]`: memory administration
for the operator."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from bot import db
from bot.config import Settings
from bot.errors import ModelUnavailable
from bot.memory.service import build_memory

log = logging.getLogger(__name__)


async def run_memories(
    settings: Settings, command: str, user: str | None, persona: str | None = None
) -> int:
    url = await asyncio.to_thread(db.database_url, settings)
    pool = await db.connect(url, settings.migrations_dir)
    memory = build_memory(settings, pool)
    try:
        if command == "export":
            rows = await memory.export(user or "", persona)
            kept = {"user": user, "persona": persona, "memories": rows}
            sys.stdout.write(json.dumps(kept, indent=2) + "\n")
            return 0
        try:
            model, moved = await memory.reembed()
        except ModelUnavailable as exc:
            log.error("reembed stopped: %s", exc)
            sys.stderr.write("error: no embedding model answered; nothing more was moved\n")
            return 1
        sys.stdout.write(f"moved {moved} memories to {model}\n")
        return 0
    finally:
        await memory.aclose()
        await pool.close()
