"""The Matrix adapter against a real Synapse on loopback, with the fake Ollama behind the engine.

One Synapse per test session; each test registers its own bot and human users, so tests share
no rooms or state. The bot runs exactly as `python -m bot run` runs it (`running_app` + the
adapter's factory); the human is a second matrix-nio client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot import runner
from bot.app import App, running_app
from bot.config import REPO_ROOT, Settings
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama
from tests.matrix_human import Human
from tests.synapse import MatrixUser, Synapse, available

if available():
    from bot.adapters.matrix.adapter import MatrixAdapter, create
    from bot.adapters.matrix.messages import RoomMessage


@pytest.fixture
async def bot_user(synapse: Synapse) -> MatrixUser:
    return await synapse.register("bot")


@pytest.fixture
async def human(synapse: Synapse) -> AsyncIterator[Human]:
    person = Human(synapse.url, await synapse.register("alice"))
    await person.sync(0)
    yield person
    await person.close()


@pytest.fixture
def matrix_settings(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    synapse: Synapse,
    bot_user: MatrixUser,
) -> Settings:
    return bot_settings(tmp_path, database_url, fake_ollama, synapse, bot_user)


def quiet_personas(directory: Path) -> Path:
    """The shipped personas without attention-following, so tests do not depend on chance."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in (REPO_ROOT / "personas").glob("*.yaml"):
        fields = yaml.safe_load(source.read_text())
        fields["attention_start"] = 0.0
        (directory / source.name).write_text(yaml.safe_dump(fields, allow_unicode=True))
    return directory


def bot_settings(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    synapse: Synapse,
    bot_user: MatrixUser,
    **overrides: object,
) -> Settings:
    values: dict[str, object] = {
        "personas_dir": quiet_personas(tmp_path / "personas"),
        "matrix_homeserver": synapse.url,
        "matrix_user_id": bot_user.user_id,
        "matrix_password": bot_user.password,
        "matrix_stream": False,
        "matrix_sync_timeout": 1.0,
        "matrix_rate_burst": 100,
        "guard_enabled": False,
        "memory_enabled": False,
        "web_enabled": False,
    }
    values.update(overrides)
    return make_settings(tmp_path, database_url, fake_ollama.url, **values)


@contextlib.asynccontextmanager
async def running_bot(settings: Settings) -> AsyncIterator[tuple[App, MatrixAdapter]]:
    async with running_app(settings) as app:
        adapter = create(app)
        assert adapter is not None
        await adapter.start()
        try:
            yield app, adapter
        finally:
            await adapter.stop()


async def group_room(human: Human, synapse: Synapse, bot: MatrixUser) -> str:
    """A room with the human, the bot and a third (invited) member: not a DM."""
    third = await synapse.register("carol")
    room = await human.create_room([bot.user_id, third.user_id])
    await human.wait_membership(room, bot.user_id, "join")
    return room


def persona_requests(fake: FakeOllama, model: str = "llama3.2:3b") -> list[dict[str, Any]]:
    return [body for body in fake.chat_requests() if body["model"] == model]


async def settle(adapter: MatrixAdapter, human: Human) -> None:
    """Let the bot finish what it is doing, then collect what it sent."""
    await asyncio.sleep(0.3)
    await adapter.messages.drain()
    await human.sync(0)


async def handled(app: App, event_id: str, wait: float = 20.0) -> None:
    """Wait until the bot has taken up the event (claimed it), whatever it decided."""
    deadline = asyncio.get_running_loop().time() + wait
    query = "SELECT 1 FROM matrix_events WHERE event_id = $1 AND NOT from_bot"
    while await app.pool.fetchval(query, event_id) is None:
        assert asyncio.get_running_loop().time() < deadline, f"{event_id} was never handled"
        await asyncio.sleep(0.05)


def replied_to(event: dict[str, Any]) -> str | None:
    relates = event["content"].get("m.relates_to", {})
    return relates.get("m.in_reply_to", {}).get("event_id")


async def test_mention_gets_exactly_one_reply(
    matrix_settings: Settings,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    async with running_bot(matrix_settings) as (app, adapter):
        room = await group_room(human, synapse, bot_user)
        chatter = await human.send(room, "just chatting among ourselves")
        await handled(app, chatter)
        fake_ollama.queue_reply("Hi! **Bold** <b>raw</b> words")
        asked = await human.send(room, f"{bot_user.localpart}: hello", mention=bot_user.user_id)
        replies = await human.wait_for(room, bot_user.user_id)
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
    matrix_settings: Settings,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    async with running_bot(matrix_settings) as (_, adapter):
        room = await group_room(human, synapse, bot_user)
        fake_ollama.queue_reply("the first answer")
        await human.send(room, "first question", mention=bot_user.user_id)
        first = (await human.wait_for(room, bot_user.user_id))[0]
        fake_ollama.queue_reply("the second answer")
        follow = await human.send(room, "and a follow-up", reply_to=first["event_id"])
        second = (await human.wait_for(room, bot_user.user_id, 2))[1]
        await settle(adapter, human)
    assert replied_to(second) == follow
    assert len(human.from_user(room, bot_user.user_id)) == 2
    contents = [m["content"] for m in persona_requests(fake_ollama)[-1]["messages"]]
    assert contents[1:] == ["first question", "the first answer", "and a follow-up"]


async def test_thread_is_its_own_conversation(
    matrix_settings: Settings,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    async with running_bot(matrix_settings) as (_, adapter):
        room = await group_room(human, synapse, bot_user)
        fake_ollama.queue_reply("room answer")
        await human.send(room, "a room question", mention=bot_user.user_id)
        await human.wait_for(room, bot_user.user_id)
        root = await human.send(room, "starting a thread about cats")
        fake_ollama.queue_reply("thread answer")
        await human.send(room, "what about cats?", mention=bot_user.user_id, thread_root=root)
        in_thread = (await human.wait_for(room, bot_user.user_id, 2))[1]
        fake_ollama.queue_reply("more thread")
        await human.send(room, "tell me more", thread_root=root, reply_to=in_thread["event_id"])
        last = (await human.wait_for(room, bot_user.user_id, 3))[2]
        await settle(adapter, human)
    for reply in (in_thread, last):
        relates = reply["content"]["m.relates_to"]
        assert relates["rel_type"] == "m.thread" and relates["event_id"] == root
    requests = persona_requests(fake_ollama)
    thread_first = [m["content"] for m in requests[1]["messages"][1:]]
    assert thread_first == ["what about cats?"], "the thread does not see the room's talk"
    thread_second = [m["content"] for m in requests[2]["messages"][1:]]
    assert thread_second == ["what about cats?", "thread answer", "tell me more"]


async def test_direct_message_with_access_token_login(
    tmp_path: Path,
    database_url: str,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    settings = bot_settings(
        tmp_path,
        database_url,
        fake_ollama,
        synapse,
        bot_user,
        matrix_password=None,
        matrix_access_token=bot_user.access_token,
        matrix_msgtype="m.text",
        matrix_rate_burst=1,
        matrix_rate_per_minute=0.01,
    )
    async with running_bot(settings) as (app, adapter):
        assert adapter.client.device_id == bot_user.device_id
        room = await human.create_room([bot_user.user_id], direct=True)
        await human.wait_membership(room, bot_user.user_id, "join")
        fake_ollama.queue_reply("a private hello")
        await human.send(room, "hi, no mention needed here")
        reply = (await human.wait_for(room, bot_user.user_id))[0]
        again = await human.send(room, "and again, straight away")  # over the rate limit
        await handled(app, again)
        await settle(adapter, human)
    assert reply["content"]["body"] == "a private hello"
    assert reply["content"]["msgtype"] == "m.text"
    assert len(human.from_user(room, bot_user.user_id)) == 1
    assert len(persona_requests(fake_ollama)) == 1


async def test_bang_commands(
    matrix_settings: Settings,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    guest = Human(synapse.url, await synapse.register("dave"))
    try:
        async with running_bot(matrix_settings) as (app, adapter):
            room = await human.create_room([bot_user.user_id, guest.user.user_id])
            await human.wait_membership(room, bot_user.user_id, "join")
            await guest.join(room)
            await guest.send(room, "!persona sage")  # power level 0: refused
            refused = (await human.wait_for(room, bot_user.user_id))[0]
            await human.send(room, "!persona sage")  # the room creator outranks everyone
            switched = (await human.wait_for(room, bot_user.user_id, 2))[1]
            other = await human.send(room, "!nosuchthing here")  # not ours: ignored like chat
            await handled(app, other)
            asked = await human.send(room, "!spend")  # private: answered in a direct room
            pointer = (await human.wait_for(room, bot_user.user_id, 3))[2]
            direct = await human.accept_invite()
            report, chart = await human.wait_for(direct, bot_user.user_id, 2)
            await human.set_power(room, guest.user.user_id, 50)  # a moderator may switch
            levels = adapter.client.rooms[room].power_levels
            for _ in range(400):  # until the bot's sync has taken the new levels in
                if levels.get_user_level(guest.user.user_id) >= 50:
                    break
                await asyncio.sleep(0.05)
            await guest.send(room, "!persona mimi")
            promoted = (await human.wait_for(room, bot_user.user_id, 4))[3]
            await settle(adapter, human)
            conversation = await app.engine.conversation("matrix", room)
    finally:
        await guest.close()
    assert "Only an admin" in refused["content"]["body"]
    assert "Sage is here now" in switched["content"]["body"]
    assert "Mimi is here now" in promoted["content"]["body"]
    assert conversation.persona == "mimi"
    assert replied_to(pointer) == asked and "direct message" in pointer["content"]["body"]
    assert report["content"]["msgtype"] == "m.notice" and report["content"]["body"]
    assert chart["content"]["msgtype"] == "m.image"
    assert chart["content"]["url"].startswith("mxc://")
    assert len(human.from_user(room, bot_user.user_id)) == 4
    assert persona_requests(fake_ollama) == [], "commands never reach the model"


async def test_commands_missing_from_the_layer_are_not_available_yet(
    matrix_settings: Settings, bot_user: MatrixUser, human: Human
) -> None:
    async with running_bot(matrix_settings) as (app, adapter):
        room = await human.create_room([bot_user.user_id], direct=True)
        await human.wait_membership(room, bot_user.user_id, "join")
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
    matrix_settings: Settings,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    async with running_bot(matrix_settings) as (_, adapter):
        room = await group_room(human, synapse, bot_user)
        fake_ollama.queue_reply("answer one")
        one = await human.send(room, "question one", mention=bot_user.user_id)
        await human.wait_for(room, bot_user.user_id)
        await settle(adapter, human)
        device = adapter.client.device_id
    missed = await human.send(room, "asked while you were away", mention=bot_user.user_id)
    async with running_bot(matrix_settings) as (app, adapter):
        assert adapter.client.device_id == device, "the device id is kept"
        fake_ollama.queue_reply("answer three")
        three = await human.send(room, "question three", mention=bot_user.user_id)
        await human.wait_for(room, bot_user.user_id, 2)
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


async def test_streamed_reply_is_edited_at_most_once_a_second(
    tmp_path: Path,
    database_url: str,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    settings = bot_settings(
        tmp_path, database_url, fake_ollama, synapse, bot_user, matrix_stream=True
    )
    text = " ".join(f"word{i}" for i in range(16))
    fake_ollama.token_delay = 0.15
    async with running_bot(settings) as (_, adapter):
        room = await group_room(human, synapse, bot_user)
        fake_ollama.queue_reply(text)
        await human.send(room, "tell me a long story", mention=bot_user.user_id)
        first = (await human.wait_for(room, bot_user.user_id))[0]
        while human.final_text(room, first) != text:
            await human.sync()
        await settle(adapter, human)
    assert len(human.from_user(room, bot_user.user_id)) == 1
    assert first["content"]["body"] != text, "the first message shows the reply in progress"
    edits = human.from_user(room, bot_user.user_id, edits=True)
    assert 1 <= len(edits) <= 4
    times = [first["origin_server_ts"]] + [e["origin_server_ts"] for e in edits]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 900 for gap in gaps), gaps
    assert bot_user.user_id in human.typing.get(room, set())


async def test_undecryptable_message_gets_a_notice(
    matrix_settings: Settings,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
) -> None:
    async with running_bot(matrix_settings) as (_, adapter):
        room = await group_room(human, synapse, bot_user)
        encrypted = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
            "device_id": "RJYKSTBOIE",
            "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA",
            "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
        }
        await human.send(room, "", event_type="m.room.encrypted", content=encrypted)
        notice = (await human.wait_for(room, bot_user.user_id))[0]
        await settle(adapter, human)
    assert "encrypted" in notice["content"]["body"]
    assert notice["content"]["msgtype"] == "m.notice"


async def test_invites_only_from_allowed_inviters(
    tmp_path: Path,
    database_url: str,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    settings = bot_settings(
        tmp_path,
        database_url,
        fake_ollama,
        synapse,
        bot_user,
        matrix_allowed_inviters="@someone-else:localhost, example.org",
    )
    async with running_bot(settings):
        room = await human.create_room([bot_user.user_id])
        await human.wait_membership(room, bot_user.user_id, "leave")


async def test_run_starts_the_matrix_adapter_when_configured(
    matrix_settings: Settings, bot_user: MatrixUser, human: Human, fake_ollama: FakeOllama
) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(matrix_settings, stop))
    try:
        room = await human.create_room([bot_user.user_id], direct=True)
        await human.wait_membership(room, bot_user.user_id, "join")
        fake_ollama.queue_reply("up and running")
        await human.send(room, "are you there?")
        reply = (await human.wait_for(room, bot_user.user_id))[0]
    finally:
        stop.set()
        assert await running == 0
    assert reply["content"]["body"] == "up and running"


def _e2e_available() -> bool:
    try:
        from nio.crypto import ENCRYPTION_ENABLED
    except ImportError:
        return False
    return bool(ENCRYPTION_ENABLED)


async def test_encrypted_room(
    tmp_path: Path,
    database_url: str,
    synapse: Synapse,
    bot_user: MatrixUser,
    fake_ollama: FakeOllama,
) -> None:
    if not _e2e_available():
        if os.environ.get("CI"):
            pytest.fail("matrix-nio's e2e extra is missing; CI installs it with the test extra")
        pytest.skip("matrix-nio[e2e] is not installed")
    person = Human(synapse.url, await synapse.register("erin"), key_store=tmp_path / "erin")
    settings = bot_settings(
        tmp_path, database_url, fake_ollama, synapse, bot_user, matrix_encryption=True
    )
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


async def test_admin_notices_reach_the_admin_room(
    tmp_path: Path,
    database_url: str,
    synapse: Synapse,
    bot_user: MatrixUser,
    human: Human,
    fake_ollama: FakeOllama,
) -> None:
    room = await human.create_room([bot_user.user_id])  # invited while the bot is offline
    settings = bot_settings(
        tmp_path, database_url, fake_ollama, synapse, bot_user, matrix_admin_room=room
    )
    async with running_bot(settings) as (app, _):
        await human.wait_membership(room, bot_user.user_id, "join")
        assert await app.notifier.send("the budget is at 80%") == 1
        notice = (await human.wait_for(room, bot_user.user_id))[0]
    assert notice["content"] == {
        "msgtype": "m.notice",
        "body": "the budget is at 80%",
        "format": "org.matrix.custom.html",
        "formatted_body": "<p>the budget is at 80%</p>",
    }
