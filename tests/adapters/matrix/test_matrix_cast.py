"""A cast of two personas (mimi and sage) in one room of the real Synapse, stock rate limits,
the real engine and Postgres, and the fake Ollama: naming one gets that one, a reply to a
persona's message goes to that persona, an unaddressed message gets at most one answer,
persona-to-persona turns stop at the budget, and every reply carries its persona's MSC4144
per-message profile (its avatar uploaded to the media repository) and the MSC's fallback."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from nio import DownloadResponse
from PIL import Image

from bot.app import App
from bot.core.commands import CommandContext
from tests.adapters.matrix.helpers import (
    GroupBot,
    SettingsWith,
    in_group_room,
    persona_requests,
    quiet_personas,
    replied_to,
    settle,
)
from tests.fakes.ollama import FakeOllama
from tests.matrix_human import Human
from tests.synapse import MatrixUser, Synapse, available

if available():
    from bot.adapters.matrix.cast import CastPlayer
    from bot.adapters.matrix.faces import PROFILE

pytestmark = pytest.mark.skipif(not available(), reason="matrix-synapse is not installed")


def cast_personas(directory: Path, **fields: object) -> Path:
    """The shipped personas (quiet) with `fields` set on each; sage gets a picture avatar."""
    quiet_personas(directory)
    for name in ("mimi", "sage"):
        path = directory / f"{name}.yaml"
        data = {**yaml.safe_load(path.read_text()), **fields}
        if name == "sage":
            data["avatar"] = "sage.png"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    picture = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 90, 160)).save(picture, format="PNG")
    (directory / "sage.png").write_bytes(picture.getvalue())
    return directory


@pytest.fixture
def cast_bot(
    settings_with: SettingsWith, human: Human, synapse: Synapse, bot_user: MatrixUser
) -> GroupBot:
    """The bot in a new group room whose cast is mimi and sage (persona fields as given)."""

    def start(tmp_path: Path, **fields: object) -> Any:
        settings = settings_with(personas_dir=cast_personas(tmp_path / "cast", **fields))
        return in_group_room(settings, human, synapse, bot_user)

    return start


async def make_cast(app: App, room: str) -> None:
    admin = CommandContext("matrix", room, "@admin:localhost", "admin", is_admin=True)
    await app.commands.run(admin, "persona", ["mimi"])
    await app.commands.run(admin, "persona", ["cast", "add", "sage"])


def profile(event: dict[str, Any]) -> dict[str, Any]:
    return dict(event["content"][PROFILE])


async def test_naming_one_gets_that_one_under_its_own_profile(
    cast_bot: GroupBot,
    tmp_path: Path,
    human: Human,
    bot_user: MatrixUser,
    fake_ollama: FakeOllama,
) -> None:
    async with cast_bot(tmp_path) as (app, adapter, room):
        await make_cast(app, room)
        fake_ollama.queue_reply("Four, **of course**.")
        asked = await human.send(room, "Sage, what is two and two?")
        [answer] = await human.wait_for(room, bot_user.user_id, 1)
        fake_ollama.queue_reply("Six.")
        follow = await human.send(room, "and three and three?", reply_to=answer["event_id"])
        [_, again] = await human.wait_for(room, bot_user.user_id, 2)
        await settle(adapter, human)
        # After a restart the stage is empty: the profile read back names the persona.
        fresh = CastPlayer(
            app.engine,
            adapter.messages.threads,
            adapter.messages.cast.avatars,
            adapter.messages.attention,
            answer_dms=True,
            answer_bots=False,
        )
        cast = await fresh.cast(room, room)
        assert await fresh.author(room, answer["event_id"], cast) == "sage"
    assert len(human.from_user(room, bot_user.user_id)) == 2, "Mimi never spoke"
    assert replied_to(answer) == asked and replied_to(again) == follow
    sage = profile(answer)
    assert sage["id"] == "sage" and sage["displayname"] == "Sage"
    assert sage["has_fallback"] is True
    assert profile(again)["id"] == "sage", "a reply to Sage's message goes to Sage"
    content = answer["content"]
    assert content["body"] == "Sage: Four, **of course**."
    assert content["formatted_body"].startswith(
        '<p><strong data-mx-profile-fallback="">Sage: </strong>Four, <strong>of course</strong>'
    )
    system = persona_requests(fake_ollama)[0]["messages"][0]["content"]
    assert "Sage" in system and "Mimi" not in system
    # The avatar is the picture in the personas directory, uploaded once.
    assert (
        sage["avatar_url"].startswith("mxc://")
        and profile(again)["avatar_url"] == sage["avatar_url"]
    )
    downloaded = await human.client.download(mxc=sage["avatar_url"])
    assert isinstance(downloaded, DownloadResponse)
    assert downloaded.body == (tmp_path / "cast" / "sage.png").read_bytes()


async def test_an_unaddressed_message_gets_at_most_one(
    cast_bot: GroupBot, tmp_path: Path, human: Human, bot_user: MatrixUser
) -> None:
    # Both follow the talk surely for an hour once addressed; no persona answers another.
    fields = {"attention_start": 1.0, "attention_window": 3600, "max_persona_turns": 0}
    async with cast_bot(tmp_path, **fields) as (app, adapter, room):
        await make_cast(app, room)
        await human.send(room, "Mimi and Sage, good morning")
        both = await human.wait_for(room, bot_user.user_id, 2)
        await human.send(room, "lovely weather today")
        await human.wait_for(room, bot_user.user_id, 3)
        await settle(adapter, human)
    replies = human.from_user(room, bot_user.user_id)
    assert {profile(r)["id"] for r in both} == {"mimi", "sage"}, "naming both gets both"
    assert len(replies) == 3, "the unaddressed message got one answer, not two"
    assert profile(replies[2])["id"] in {"mimi", "sage"}
    assert mimi_and_sage_fallbacks(replies)


def mimi_and_sage_fallbacks(replies: list[dict[str, Any]]) -> bool:
    return all(r["content"]["body"].startswith(f"{profile(r)['displayname']}: ") for r in replies)


async def test_persona_turns_stop_at_the_budget(
    cast_bot: GroupBot,
    tmp_path: Path,
    human: Human,
    bot_user: MatrixUser,
    fake_ollama: FakeOllama,
) -> None:
    async with cast_bot(tmp_path) as (app, adapter, room):
        await make_cast(app, room)
        fake_ollama.queue_reply("Sage, what do you think?")
        fake_ollama.queue_reply("Mimi, I think it is fine.")
        fake_ollama.queue_reply("Sage, are you sure?")  # turn 3: over the budget of 2
        asked = await human.send(room, "Mimi, start us off")
        await human.wait_for(room, bot_user.user_id, 2)
        await settle(adapter, human)
    replies = human.from_user(room, bot_user.user_id)
    assert [profile(r)["id"] for r in replies] == ["mimi", "sage"]
    assert replied_to(replies[0]) == asked
    assert replied_to(replies[1]) == replies[0]["event_id"], "Sage answers Mimi's message"
    assert "m.mentions" in replies[1]["content"] and replies[1]["content"]["m.mentions"] == {}
    requests = persona_requests(fake_ollama)
    assert len(requests) == 2, "the third turn was over the budget"
    heard = requests[1]["messages"]
    assert "Sage" in heard[0]["content"]
    assert heard[-1]["role"] == "user" and "Sage, what do you think?" in heard[-1]["content"]


async def test_a_thread_plays_its_rooms_cast(
    cast_bot: GroupBot, tmp_path: Path, human: Human, bot_user: MatrixUser
) -> None:
    async with cast_bot(tmp_path, max_persona_turns=0) as (app, adapter, room):
        await make_cast(app, room)
        root = await human.send(room, "a thread about tea")
        asked = await human.send(room, "Sage, green or black?", thread_root=root)
        [answer] = await human.wait_for(room, bot_user.user_id, 1)
        await settle(adapter, human)
        thread = f"{room}|{root}"
        own = await app.engine.cast_for("matrix", thread)
        admin = CommandContext("matrix", thread, "@admin:localhost", "admin", is_admin=True)
        await app.commands.run(admin, "persona", ["cast", "remove", "sage"])
        in_room = await app.engine.cast_for("matrix", room)
    assert profile(answer)["id"] == "sage", "the room's cast answers in its thread"
    relates = answer["content"]["m.relates_to"]
    assert relates["rel_type"] == "m.thread" and relates["event_id"] == root
    assert relates["m.in_reply_to"] == {"event_id": asked}
    assert [p.name for p in own] == ["mimi", "sage"], "the thread keeps a copy of the cast"
    assert [p.name for p in in_room] == ["mimi", "sage"], "changing it leaves the room's alone"


async def test_a_thread_on_a_personas_message_goes_to_that_persona(
    cast_bot: GroupBot,
    tmp_path: Path,
    human: Human,
    bot_user: MatrixUser,
    fake_ollama: FakeOllama,
) -> None:
    async with cast_bot(tmp_path, max_persona_turns=0) as (app, adapter, room):
        await make_cast(app, room)
        fake_ollama.queue_reply("Four.")
        await human.send(room, "Sage, what is two and two?")
        [answer] = await human.wait_for(room, bot_user.user_id, 1)
        fake_ollama.queue_reply("Because two and two make four.")
        await human.send(room, "why?", thread_root=answer["event_id"])
        [_, in_thread] = await human.wait_for(room, bot_user.user_id, 2)
        await settle(adapter, human)
    assert profile(in_thread)["id"] == "sage", "a thread on Sage's message is a reply to Sage"
    heard = [(m["role"], m["content"]) for m in persona_requests(fake_ollama)[1]["messages"][1:]]
    assert heard == [
        ("user", "Sage, what is two and two?"),
        ("assistant", "Four."),  # Sage's own words, as its own, without the name fallback
        ("user", "why?"),
    ]
