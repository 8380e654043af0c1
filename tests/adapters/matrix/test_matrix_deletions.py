"""Matrix redactions and edits are honoured (issue 15), against the real Synapse on loopback:
a redacted message leaves the engine's history with the reply to it; an edit (`m.replace`)
replaces the stored text."""

from __future__ import annotations

import asyncio

from bot.app import App
from tests.adapters.matrix.helpers import GroupBot, settle
from tests.fakes.ollama import FakeOllama
from tests.matrix_human import Human
from tests.synapse import MatrixUser


async def stored(app: App) -> list[str]:
    rows = await app.pool.fetch(
        "SELECT m.content FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE c.platform = 'matrix' ORDER BY m.id"
    )
    return [r["content"] for r in rows]


async def until(app: App, wanted: list[str], wait: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + wait
    while await stored(app) != wanted:
        assert asyncio.get_running_loop().time() < deadline, await stored(app)
        await asyncio.sleep(0.1)


async def test_redacted_and_edited_messages(
    group_bot: GroupBot, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    async with group_bot() as (app, adapter, room):
        fake_ollama.queue_reply("Noted.")
        secret = await human.send(
            room, f"{bot_user.localpart}: my PIN is 1234", mention=bot_user.user_id
        )
        await human.wait_for(room, bot_user.user_id)
        await settle(adapter, human)
        await until(app, [f"{bot_user.localpart}: my PIN is 1234", "Noted."])
        fake_ollama.queue_reply("Coffee!")
        typo = await human.send(
            room, f"{bot_user.localpart}: I like cofee", mention=bot_user.user_id
        )
        await until(
            app,
            [
                f"{bot_user.localpart}: my PIN is 1234",
                "Noted.",
                f"{bot_user.localpart}: I like cofee",
                "Coffee!",
            ],
        )
        await human.client.room_redact(room, secret, reason="oops")
        edit = {
            "msgtype": "m.text",
            "body": f"* {bot_user.localpart}: I like coffee",
            "m.new_content": {"msgtype": "m.text", "body": f"{bot_user.localpart}: I like coffee"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": typo},
        }
        await human.send(room, "", content=edit)
        await until(app, [f"{bot_user.localpart}: I like coffee", "Coffee!"])
        assert len([b for b in fake_ollama.chat_requests()]) == 2, "an edit is not answered"
