"""Matrix as Element users see it (issue 18), against the real Synapse with stock message rate
limits (`rc_message` 0.2/s, burst 10): mentions, direct rooms, threads, withheld replies,
logins that survive restarts, health, and replies under the rate limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from nio import AsyncClient, AsyncClientConfig, RoomSendResponse

from bot.config import Settings
from tests.adapters.matrix.helpers import (
    Ask,
    GroupBot,
    SettingsWith,
    direct_room,
    handled,
    persona_requests,
    replied_to,
    running_bot,
    settle,
)
from tests.fakes.fly import FakeFly, MachineOllama
from tests.fakes.ollama import FakeOllama
from tests.matrix_human import Human
from tests.safety.llama_guard import GuardScript
from tests.synapse import MatrixUser, Synapse


def _message(text: str, mentions: list[str]) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": text, "m.mentions": {"user_ids": mentions}}


async def test_m_mentions_decide_and_the_localpart_is_no_trigger(
    group_bot: GroupBot, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    async with group_bot() as (app, adapter, room):
        persona = await app.engine.persona_for("matrix", room)
        localpart = await human.send(
            room, "", content=_message(f"{bot_user.localpart} is a funny name", [])
        )
        await handled(app, localpart)
        fake_ollama.queue_reply("you called?")
        by_mention = await human.send(room, "", content=_message("over to you", [bot_user.user_id]))
        await human.wait_for(room, bot_user.user_id)
        fake_ollama.queue_reply("that's me")
        by_name = await human.send(room, "", content=_message(f"{persona.display_name}, hi", []))
        await human.wait_for(room, bot_user.user_id, 2)
        await settle(adapter, human)
    answered = [replied_to(r) for r in human.from_user(room, bot_user.user_id)]
    assert answered == [by_mention, by_name]
    assert len(persona_requests(fake_ollama)) == 2


async def test_a_two_member_room_is_not_a_direct_room(
    matrix_settings: Settings, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    async with running_bot(matrix_settings) as (app, adapter):
        room = await human.create_room([bot_user.user_id])  # no is_direct: a small group
        await human.wait_membership(room, bot_user.user_id, "join")
        chatter = await human.send(room, "just a note to self")
        await handled(app, chatter)
        direct = await direct_room(human, bot_user)
        fake_ollama.queue_reply("hello in private")
        await human.send(direct, "hi")
        await human.wait_for(direct, bot_user.user_id)
        await settle(adapter, human)
        marked = adapter.direct.is_direct(direct), adapter.direct.is_direct(room)
    assert human.from_user(room, bot_user.user_id) == []
    assert marked == (True, False)
    assert len(persona_requests(fake_ollama)) == 1


async def test_reply_in_thread_on_the_answer_keeps_the_answer_and_its_question(
    group_bot: GroupBot, ask: Ask, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    async with group_bot() as (_, adapter, room):
        _, answer = await ask(room, "capital of France?", "Paris.", mention=bot_user.user_id)
        # Element's "reply in thread": a thread on the answer, `is_falling_back` set.
        asked, in_thread = await ask(
            room, "and Germany?", "Berlin.", nth=2, thread_root=answer["event_id"]
        )
        await settle(adapter, human)
    relates = in_thread["content"]["m.relates_to"]
    assert relates["rel_type"] == "m.thread" and relates["event_id"] == answer["event_id"]
    assert relates["m.in_reply_to"]["event_id"] == asked
    seen = [m["content"] for m in persona_requests(fake_ollama)[-1]["messages"][1:]]
    assert seen == ["capital of France?", "Paris.", "and Germany?"]


@pytest.fixture
async def guard_fake() -> AsyncIterator[FakeOllama]:
    """Llama Guard as the bot asks it (a raw Llama Guard 3 prompt to /api/generate, read by
    tests/safety/llama_guard.py): 'unsafe' with S10 when the text judged contains HATEFUL."""
    script = GuardScript(rules={"HATEFUL": "unsafe\nS10"})
    async with FakeOllama(models=["llama-guard3:1b"], responder=script) as fake:
        yield fake


async def test_a_withheld_reply_is_redacted_then_the_notice_is_posted(
    group_bot: GroupBot,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
    guard_fake: FakeOllama,
) -> None:
    async with group_bot(
        matrix_stream=True,
        guard_enabled=True,
        guard_host=guard_fake.url,
        guard_stream_mode="paragraph",  # shows checked paragraphs, so a block comes late
    ) as (_, adapter, room):
        fake_ollama.queue_reply("Fine start.\n\nThen HATEFUL words.\n\nMore.")
        await human.send(room, "tell me a story", mention=bot_user.user_id)
        shown, notice = await human.wait_for(room, bot_user.user_id, 2)
        await settle(adapter, human)
    assert shown["content"]["body"] == "Fine start."
    edits = [e["event_id"] for e in human.from_user(room, bot_user.user_id, edits=True)]
    redacted = {
        e.get("redacts") or e["content"].get("redacts")
        for e in human.events[room]
        if e.get("type") == "m.room.redaction" and e.get("sender") == bot_user.user_id
    }
    assert redacted == {shown["event_id"], *edits}, "the original and every edit"
    assert notice["content"]["msgtype"] == "m.notice" and "m.new_content" not in notice["content"]
    assert "Hate" in notice["content"]["body"]
    positions = [e.get("event_id") for e in human.events[room]]
    first_redaction = min(
        i for i, e in enumerate(human.events[room]) if e.get("type") == "m.room.redaction"
    )
    assert first_redaction < positions.index(notice["event_id"]), "redacted, then the notice"


async def test_concurrent_replies_under_the_stock_rate_limit_all_land(
    settings_with: SettingsWith,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_with(matrix_stream=True)
    caplog.set_level(logging.INFO, logger="bot.adapters.matrix")
    other = Human(synapse.url, await synapse.register("bob"))
    texts = [" ".join(f"{who}{i}" for i in range(12)) for who in ("ann", "ben")]
    fake_ollama.token_delay = 0.1
    try:
        async with running_bot(settings) as (_, adapter):
            room = await human.create_room([bot_user.user_id, other.user.user_id])
            await human.wait_membership(room, bot_user.user_id, "join")
            await other.join(room)
            await _use_up_the_burst(synapse, bot_user, adapter.client.access_token, room)
            for text in texts:
                fake_ollama.queue_reply(text)
            asked = await asyncio.gather(
                human.send(room, "first question", mention=bot_user.user_id),
                other.send(room, "second question", mention=bot_user.user_id),
            )
            async with asyncio.timeout(120):  # each message past the burst costs 5 s
                while sorted(_answers(human, room, bot_user, asked).values()) != texts:
                    await human.sync()
            await settle(adapter, human)
    finally:
        await other.close()
    replies = [r for r in human.from_user(room, bot_user.user_id) if replied_to(r) in asked]
    assert sorted(replied_to(r) or "" for r in replies) == sorted(asked), "one reply each"
    assert any("rate limited in" in r.getMessage() for r in caplog.records), "it was limited"


def _answers(human: Human, room: str, bot: MatrixUser, asked: list[str]) -> dict[str, str]:
    """Question id → the final text of the bot's reply to it (after its edits)."""
    replies = [r for r in human.from_user(room, bot.user_id) if replied_to(r) in asked]
    return {replied_to(r) or "": human.final_text(room, r) for r in replies}


async def _use_up_the_burst(synapse: Synapse, bot: MatrixUser, token: str, room: str) -> int:
    """Messages from the bot's account until the homeserver says M_LIMIT_EXCEEDED; how many
    got through (the burst is 10; what the bot sent already counts)."""
    client = AsyncClient(synapse.url, bot.user_id, config=AsyncClientConfig(max_limit_exceeded=0))
    client.restore_login(bot.user_id, "BURST", token)
    try:
        for number in range(12):
            content = {"msgtype": "m.notice", "body": f"filler {number}"}
            response = await client.room_send(room, "m.room.message", content)
            if not isinstance(response, RoomSendResponse):
                assert response.status_code == "M_LIMIT_EXCEEDED", response
                return number
    finally:
        await client.close()
    raise AssertionError("twelve messages and no rate limit: is rc_message the stock one?")


async def test_typing_in_a_direct_room_pre_wakes_a_sleeping_gpu(
    settings_with: SettingsWith, bot_user: MatrixUser, human: Human
) -> None:
    async with MachineOllama() as gpu, FakeFly(ollama=gpu, boot_seconds=0.05) as fly:
        backend = {
            "name": "fly-gpu",
            "url": gpu.url,
            "models": ["llama3.2:3b"],
            "wake": {"driver": "fly", "app": fly.app, "machine": fly.machine, "api_url": fly.url},
        }
        settings = settings_with(
            backends=[backend],
            fly_api_token="fly-test-token-123",
            backend_wake_poll=0.02,
        )
        async with running_bot(settings):
            room = await direct_room(human, bot_user)
            assert fly.count("POST", "start") == 0, "asleep until someone types"
            await human.client.room_typing(room, typing_state=True, timeout=10_000)
            for _ in range(200):
                if fly.count("POST", "start"):
                    break
                await asyncio.sleep(0.05)
            started = fly.count("POST", "start")
        asked = [r for r in gpu.chat_requests() if r.get("messages")]
    assert started == 1, "the GPU is woken before any message arrives"
    assert asked == [], "typing answers nothing"


async def test_typing_is_renewed_while_a_slow_reply_is_prepared(
    group_bot: GroupBot, ask: Ask, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    # A 3 s typing notice (30 s by default) and an 11 s reply: without renewal the bot would
    # stop "typing" half-way, as it did during a GPU's cold start. (Synapse looks for expired
    # notices every 5 s, so one expires 3 to 8 s after it was sent.)
    fake_ollama.token_delay = 1.0
    async with group_bot(matrix_typing_timeout=3.0) as (_, adapter, room):
        slow = " ".join(f"slow{i}" for i in range(11))
        _, reply = await ask(room, "take your time", slow, mention=bot_user.user_id)
        await settle(adapter, human)
    sent = reply["origin_server_ts"] / 1000
    seen = [users for at, r, users in human.typing_log if r == room and at < sent - 0.5]
    start = next(i for i, users in enumerate(seen) if bot_user.user_id in users)
    assert all(bot_user.user_id in users for users in seen[start:]), seen
    began = next(at for at, r, users in human.typing_log if bot_user.user_id in users)
    assert sent - began > 9, "the reply outlasted a typing notice and Synapse's check"


async def test_a_direct_room_joined_before_m_direct_was_kept_is_still_direct(
    matrix_settings: Settings, ask: Ask, bot_user: MatrixUser, human: Human
) -> None:
    async with running_bot(matrix_settings) as (_, adapter):
        room = await direct_room(human, bot_user)
        token = adapter.client.access_token
    # An older version never wrote m.direct: empty the bot's, then start it again.
    async with httpx.AsyncClient() as http:
        response = await http.put(
            f"{matrix_settings.matrix_homeserver}/_matrix/client/v3/user/"
            f"{bot_user.user_id}/account_data/m.direct",
            headers={"Authorization": f"Bearer {token}"},
            json={},
        )
    response.raise_for_status()
    async with running_bot(matrix_settings) as (_, adapter):
        _, reply = await ask(room, "no mention needed here", "still a direct chat")
        await settle(adapter, human)
    assert reply["content"]["body"] == "still a direct chat"
