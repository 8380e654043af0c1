"""The Matrix adapter against a real Synapse on loopback, with the fake Ollama behind the engine.

One Synapse per test session; each test registers its own bot and human users, so tests share
no rooms or state. The bot runs exactly as `python -m bot run` runs it (`running_app` + the
adapter's factory); the human is a second matrix-nio client.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from decimal import Decimal
from pathlib import Path

import pytest

from bot import runner
from bot.config import Settings
from tests.adapters.matrix.helpers import (
    Ask,
    GroupBot,
    SettingsWith,
    direct_room,
    e2e_available,
    handled,
    persona_requests,
    replied_to,
    running_bot,
    settle,
)
from tests.fakes.ollama import FakeOllama
from tests.matrix_human import Human
from tests.synapse import MatrixUser, Synapse, available

if available():
    from bot.adapters.matrix.messages import RoomMessage


async def test_mention_gets_exactly_one_reply(
    group_bot: GroupBot, ask: Ask, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    async with group_bot() as (app, adapter, room):
        chatter = await human.send(room, "just chatting among ourselves")
        await handled(app, chatter)
        hello = f"{bot_user.localpart}: hello"
        asked, _ = await ask(room, hello, "Hi! **Bold** <b>raw</b> words", mention=bot_user.user_id)
        await settle(adapter, human)
    replies = human.from_user(room, bot_user.user_id)
    assert len(replies) == 1
    content = replies[0]["content"]
    assert replied_to(replies[0]) == asked
    assert content["msgtype"] == "m.notice"
    assert content["m.mentions"] == {"user_ids": [human.user.user_id]}
    assert content["body"] == "Hi! **Bold** <b>raw</b> words"
    assert content["format"] == "org.matrix.custom.html"
    assert "<strong>Bold</strong>" in content["formatted_body"]
    assert "<b>" not in content["formatted_body"], "raw HTML from the model is escaped"
    assert len(persona_requests(fake_ollama)) == 1, "the unaddressed message got no answer"


async def test_reply_chain_continues_the_conversation(
    group_bot: GroupBot, ask: Ask, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    async with group_bot() as (_, adapter, room):
        _, first = await ask(room, "first question", "the first answer", mention=bot_user.user_id)
        follow, second = await ask(
            room, "and a follow-up", "the second answer", nth=2, reply_to=first["event_id"]
        )
        await settle(adapter, human)
    assert replied_to(second) == follow
    assert len(human.from_user(room, bot_user.user_id)) == 2
    contents = [m["content"] for m in persona_requests(fake_ollama)[-1]["messages"]]
    assert contents[1:] == ["first question", "the first answer", "and a follow-up"]


async def test_thread_is_its_own_conversation(
    group_bot: GroupBot, ask: Ask, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    async with group_bot() as (_, adapter, room):
        await ask(room, "a room question", "room answer", mention=bot_user.user_id)
        root = await human.send(room, "starting a thread about cats")
        _, in_thread = await ask(
            room,
            "what about cats?",
            "thread answer",
            nth=2,
            mention=bot_user.user_id,
            thread_root=root,
        )
        _, last = await ask(
            room,
            "tell me more",
            "more thread",
            nth=3,
            thread_root=root,
            reply_to=in_thread["event_id"],
        )
        await settle(adapter, human)
    for reply in (in_thread, last):
        relates = reply["content"]["m.relates_to"]
        assert relates["rel_type"] == "m.thread" and relates["event_id"] == root
    requests = persona_requests(fake_ollama)
    # The thread starts from its root; the room's talk stays outside.
    opening = "starting a thread about cats\n\nwhat about cats?"
    thread_first = [m["content"] for m in requests[1]["messages"][1:]]
    assert thread_first == [opening]
    thread_second = [m["content"] for m in requests[2]["messages"][1:]]
    assert thread_second == [opening, "thread answer", "tell me more"]


async def test_direct_message_with_access_token_login(
    settings_with: SettingsWith,
    ask: Ask,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    settings = settings_with(
        matrix_password=None,
        matrix_access_token=bot_user.access_token,
        matrix_msgtype="m.text",
        matrix_rate_burst=1,
        matrix_rate_per_minute=0.01,
    )
    async with running_bot(settings) as (app, adapter):
        assert adapter.client.device_id == bot_user.device_id
        room = await direct_room(human, bot_user)
        _, reply = await ask(room, "hi, no mention needed here", "a private hello")
        again = await human.send(room, "and again, straight away")  # over the rate limit
        await handled(app, again)
        await settle(adapter, human)
    assert reply["content"]["body"] == "a private hello"
    assert reply["content"]["msgtype"] == "m.text"
    assert len(human.from_user(room, bot_user.user_id)) == 1
    assert len(persona_requests(fake_ollama)) == 1


async def test_bang_commands(
    settings_with: SettingsWith,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    settings = settings_with(matrix_admins=human.user.user_id)
    guest = Human(synapse.url, await synapse.register("dave"))
    try:
        async with running_bot(settings) as (app, adapter):
            # The guest creates the room: power level 100 there, and still no admin here.
            room = await guest.create_room([bot_user.user_id, human.user.user_id])
            await guest.wait_membership(room, bot_user.user_id, "join")
            await human.join(room)
            await guest.send(room, "!persona sage")
            refused = (await human.wait_for(room, bot_user.user_id))[0]
            await human.send(room, "!persona sage")  # in MATRIX_ADMINS, at power level 0
            switched = (await human.wait_for(room, bot_user.user_id, 2))[1]
            other = await human.send(room, "!nosuchthing here")  # not ours: ignored like chat
            await handled(app, other)
            assert app.ledger is not None  # a picture of sage's, for the breakdown per persona
            flux = {"kind": "image", "provider": "fal", "model": "fal-ai/flux/dev"}
            await app.ledger.record(**flux, units=Decimal(2), request_id="p", persona="sage")
            asked = await human.send(room, "!spend")  # private: answered in a direct room
            pointer = (await human.wait_for(room, bot_user.user_id, 3))[2]
            direct = await human.accept_invite()
            report, chart = await human.wait_for(direct, bot_user.user_id, 2)
            await settle(adapter, human)
            conversation = await app.engine.conversation("matrix", room)
            marked_direct = adapter.direct.is_direct(direct)
    finally:
        await guest.close()
    assert "Only an admin" in refused["content"]["body"]
    assert "Sage is here now" in switched["content"]["body"]
    assert conversation.persona == "sage"
    assert replied_to(pointer) == asked and "direct message" in pointer["content"]["body"]
    assert report["content"]["msgtype"] == "m.notice" and report["content"]["body"]
    by_persona = report["content"]["body"].split("By persona (settled)", 1)[1]
    assert "sage" in by_persona and "$0.0500" in by_persona
    assert chart["content"]["msgtype"] == "m.image"
    assert chart["content"]["url"].startswith("mxc://")
    assert marked_direct, "the room the bot opened is in its m.direct"
    assert len(human.from_user(room, bot_user.user_id)) == 3
    assert persona_requests(fake_ollama) == [], "commands never reach the model"


async def test_commands_missing_from_the_layer_are_not_available_yet(
    matrix_settings: Settings, bot_user: MatrixUser, human: Human
) -> None:
    async with running_bot(matrix_settings) as (app, adapter):
        room = await direct_room(human, bot_user)
        available = {c.name for c in app.commands.all()}
        missing = [n for n in ("memories", "forget", "imagine", "spend") if n not in available]
        await human.send(room, "!help")
        for name in missing:
            await human.send(room, f"!{name}")
        replies = await human.wait_for(room, bot_user.user_id, 1 + len(missing))
        await settle(adapter, human)
    bodies = [r["content"]["body"] for r in replies]
    assert any("persona [NAME]" in body for body in bodies), "help lists the commands"
    for name in missing:
        assert f"!{name} is not available yet." in bodies


async def test_restart_answers_nothing_old_and_nothing_twice(
    group_bot: GroupBot,
    ask: Ask,
    matrix_settings: Settings,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    async with group_bot() as (_, adapter, room):
        one, _ = await ask(room, "question one", "answer one", mention=bot_user.user_id)
        await settle(adapter, human)
        device = adapter.client.device_id
    missed = await human.send(room, "asked while you were away", mention=bot_user.user_id)
    async with running_bot(matrix_settings) as (app, adapter):
        assert adapter.client.device_id == device, "the device id is kept"
        three, _ = await ask(
            room, "question three", "answer three", nth=2, mention=bot_user.user_id
        )
        await settle(adapter, human)
        # The same event delivered again (a replayed sync) is never answered twice.
        event = next(e for e in human.events[room] if e.get("event_id") == three)
        message = RoomMessage.from_source(room, event)
        assert message is not None
        await adapter.messages.on_message(adapter.client.rooms[room], message)
        await settle(adapter, human)
        saved = await app.pool.fetchrow("SELECT * FROM matrix_state")
    replies = human.from_user(room, bot_user.user_id)
    assert [replied_to(r) for r in replies] == [one, three]
    assert missed not in [replied_to(r) for r in replies]
    assert len(persona_requests(fake_ollama)) == 2
    assert saved["account"] == bot_user.user_id and saved["device_id"] == device
    assert saved["next_batch"] and saved["caught_up_ts"] >= event["origin_server_ts"]


async def test_streamed_reply_is_edited_at_most_once_per_interval(
    group_bot: GroupBot, ask: Ask, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    text = " ".join(f"word{i}" for i in range(30))
    fake_ollama.token_delay = 0.15  # 4.5 s of streaming: two edits in progress at 2 s apart
    async with group_bot(matrix_stream=True) as (_, adapter, room):
        _, first = await ask(room, "tell me a long story", text, mention=bot_user.user_id)
        while human.final_text(room, first) != text:
            await human.sync()
        await settle(adapter, human)
    assert len(human.from_user(room, bot_user.user_id)) == 1
    assert first["content"]["body"] != text, "the first message shows the reply in progress"
    edits = human.from_user(room, bot_user.user_id, edits=True)
    assert 2 <= len(edits) <= 4
    assert edits[-1]["content"]["m.new_content"]["body"] == text
    # Edits in progress keep the room's interval (2 s); the final text does not wait for it.
    times = [first["origin_server_ts"]] + [e["origin_server_ts"] for e in edits[:-1]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 1900 for gap in gaps), gaps
    assert bot_user.user_id in human.typing.get(room, set())


async def test_encrypted_room_without_encryption_gets_one_notice_and_is_left(
    matrix_settings: Settings,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
) -> None:
    third = await synapse.register("carol")
    async with running_bot(matrix_settings) as (_, adapter):
        room = await human.create_room([bot_user.user_id, third.user_id], encrypted=True)
        await human.wait_membership(room, bot_user.user_id, "leave")
        await settle(adapter, human)
    notices = human.from_user(room, bot_user.user_id)
    assert len(notices) == 1
    assert notices[0]["content"]["msgtype"] == "m.notice"
    assert "encrypted" in notices[0]["content"]["body"]
    assert "leaving" in notices[0]["content"]["body"]


async def test_invites_only_from_allowed_inviters(
    settings_with: SettingsWith, bot_user: MatrixUser, human: Human
) -> None:
    settings = settings_with(matrix_allowed_inviters="@someone-else:localhost, example.org")
    async with running_bot(settings):
        room = await human.create_room([bot_user.user_id])
        await human.wait_membership(room, bot_user.user_id, "leave")


async def test_run_starts_the_matrix_adapter_when_configured(
    matrix_settings: Settings, ask: Ask, bot_user: MatrixUser, human: Human
) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(matrix_settings, stop))
    try:
        room = await direct_room(human, bot_user)
        _, reply = await ask(room, "are you there?", "up and running")
    finally:
        stop.set()
        assert await running == 0
    assert reply["content"]["body"] == "up and running"


async def test_encrypted_room(
    tmp_path: Path,
    settings_with: SettingsWith,
    synapse: Synapse,
    bot_user: MatrixUser,
    fake_ollama: FakeOllama,
) -> None:
    if not e2e_available():
        if os.environ.get("CI"):
            pytest.fail("matrix-nio's e2e extra is missing; CI installs it with the test extra")
        pytest.skip("matrix-nio[e2e] is not installed")
    person = Human(synapse.url, await synapse.register("erin"), key_store=tmp_path / "erin")
    settings = settings_with(matrix_encryption=True)
    try:
        await person.sync(0)
        async with running_bot(settings) as (_, adapter):
            third = await synapse.register("frank")
            room = await person.create_room([bot_user.user_id, third.user_id], encrypted=True)
            await person.wait_membership(room, bot_user.user_id, "join")
            fake_ollama.queue_reply("a secret hello")
            await person.send(room, "psst, this is private", mention=bot_user.user_id)
            reply = (await person.wait_for(room, bot_user.user_id))[0]
            await person.send(room, "!help")  # private: answered in a new direct room
            pointer = (await person.wait_for(room, bot_user.user_id, 2))[1]
            direct = await person.accept_invite()
            listing = (await person.wait_for(direct, bot_user.user_id))[0]
            await settle(adapter, person)
            direct_encrypted = person.client.rooms[direct].encrypted
    finally:
        await person.close()
    assert (
        pointer["event_id"] in person.decrypted and "direct message" in pointer["content"]["body"]
    )
    assert "persona [NAME]" in listing["content"]["body"]
    raw = [e for e in person.events[room] if e.get("type") == "m.room.encrypted"]
    assert raw == [], "every encrypted event was decrypted by the human's client"
    assert reply["content"]["body"] == "a secret hello"
    assert reply["event_id"] in person.decrypted, "the bot's reply was sent encrypted"
    asked = persona_requests(fake_ollama)[0]["messages"][-1]["content"]
    assert asked == "psst, this is private", "the bot decrypted the message"
    assert any((settings.data_dir / "matrix-store").iterdir()), "keys are kept on disk"
    assert direct_encrypted, "a private answer from an encrypted room goes to an encrypted one"
