"""The chat model's draw_image tool end to end: the fake Ollama streams a tool call, the real
fal-client draws on the fake Fal over TLS, the real ledger charges on the embedded PostgreSQL,
and the model gets the tool's result in a second chat to finish its reply."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend

from bot.adapters.console import ConsoleChat
from bot.adapters.matrix.pacing import Pacer
from bot.adapters.matrix.render import ReplyTarget, StreamedReply
from bot.app import App
from bot.brains.base import ChatRequest
from bot.brains.local import LocalBrain
from bot.brains.router import BrainRouter
from bot.config import REPO_ROOT
from bot.core.engine import Delta, Done, Event, Failed, Incoming, Notice, Picture
from bot.core.personas import Persona
from bot.core.prompts import user_seed
from bot.images.draw_tool import DRAW_IMAGE, DRAW_TOOL
from bot.images.presets import with_style
from tests.fakes.fal import FakeFal
from tests.fakes.ollama import FakeOllama
from tests.fal_fixtures import start_app
from tests.safety.llama_guard import read

FOX = {"prompt": "a red fox curled up in the snow", "size": "landscape"}


@pytest.fixture
async def app(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> AsyncIterator[App]:
    async with await start_app(tmp_path, database_url, fake_ollama) as running:
        yield running


async def converse(app: App, text: str, *, user: str = "alice", nsfw: bool = False) -> list[Event]:
    incoming = Incoming("test", "c1", user, user.title(), text, nsfw=nsfw)
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        return [event async for event in events]


async def charged(app: App, user_key: str = "test:alice") -> Decimal:
    value = await app.pool.fetchval(
        "SELECT COALESCE(sum(cost), 0) FROM ledger WHERE user_key = $1 AND status <> 'released'",
        user_key,
    )
    return Decimal(value)


def tool_message(body: dict[str, Any]) -> dict[str, Any]:
    [message] = [m for m in body["messages"] if m["role"] == "tool"]
    return message


def personas_with(tmp_path: Path, extra: str, model: str | None = None) -> Path:
    """A copy of the shipped personas with `extra` YAML lines (and another model) in each."""
    directory = tmp_path / "personas"
    shutil.copytree(REPO_ROOT / "personas", directory)
    for path in directory.glob("*.yaml"):
        text = path.read_text().replace("\ndraw: true\n", "\n")
        if model is not None:
            text = text.replace("model: llama3.2:3b", f"model: {model}")
        path.write_text(f"{text.rstrip()}\n{extra}\n")
    return directory


# -- the happy path ----------------------------------------------------------------------------


async def test_the_model_draws_and_finishes_its_reply(
    app: App, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    fake_ollama.queue_tool_call(DRAW_IMAGE, FOX)
    fake_ollama.queue_reply("Here's your fox, all cosy!")
    events = await converse(app, "can you draw me a fox?")

    first, second = fake_ollama.chat_requests()
    assert fake_ollama.offered_tools(first) == [DRAW_IMAGE]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["prompt"]
    assert not second.get("tools"), "one drawing per reply: the follow-up offers no tools"

    persona = await app.engine.persona_for("test", "c1")
    [submission] = fake_fal.submissions
    assert submission["endpoint"] == "fal-ai/flux/schnell"
    sent = submission["arguments"]
    assert sent["prompt"] == with_style(FOX["prompt"], persona.image_style)
    assert sent["image_size"] == "landscape_4_3"
    assert sent["seed"] == user_seed("test", "alice")
    assert sent["enable_safety_checker"] is True

    # the second chat carries the model's tool call and the tool's result, in Ollama's shape
    call, result = second["messages"][-2:]
    assert call["role"] == "assistant"
    assert call["tool_calls"] == [{"function": {"name": DRAW_IMAGE, "arguments": FOX}}]
    assert result == tool_message(second)
    assert result["tool_name"] == DRAW_IMAGE and result["content"].startswith("Drawn")
    assert second["messages"][:-2] == first["messages"]

    notices = [e.text for e in events if isinstance(e, Notice)]
    assert notices[0] == "Drawing…" and "Fetching the picture…" in notices
    assert not [e for e in events if isinstance(e, Failed)]
    done, picture = events[-2:]
    assert isinstance(done, Done) and done.text == "Here's your fox, all cosy!"
    assert "".join(e.text for e in events if isinstance(e, Delta)) == done.text
    assert isinstance(picture, Picture) and not picture.spoiler
    assert FOX["prompt"] in picture.caption and persona.display_name in picture.caption
    assert picture.path.parent == app.settings.data_dir / "images"
    assert await asyncio.to_thread(picture.path.read_bytes) == fake_fal.png

    assert await charged(app) == Decimal("0.003")
    rows = await app.pool.fetch("SELECT status, units FROM ledger WHERE kind = 'image'")
    assert [(r["status"], r["units"]) for r in rows] == [("settled", 1)], "charged once"
    [image] = await app.pool.fetch("SELECT status, prompt, size, user_key FROM images")
    assert (image["status"], image["prompt"], image["size"]) == ("ok", FOX["prompt"], "landscape")
    assert image["user_key"] == "test:alice"
    conversation = await app.engine.conversation("test", "c1")
    turns = await app.engine.history.recent(conversation.id)
    assert [t.content for t in turns] == ["can you draw me a fox?", done.text]


async def test_one_drawing_per_reply(app: App, fake_ollama: FakeOllama, fake_fal: FakeFal) -> None:
    fake_ollama.queue_tool_calls(
        [(DRAW_IMAGE, FOX), (DRAW_IMAGE, {"prompt": "a second fox"}), ("web_search", {})],
        text="Ooh, let me draw!",
    )
    fake_ollama.queue_reply("Done~")
    events = await converse(app, "draw two foxes")
    assert len(fake_fal.submissions) == 1
    assert await charged(app) == Decimal("0.003")
    results = [m for m in fake_ollama.chat_requests()[-1]["messages"] if m["role"] == "tool"]
    assert [m["content"].split(":")[0] for m in results] == [
        "Drawn",
        "Not drawn",
        "There is no tool called 'web_search'.",
    ]
    done = next(e for e in events if isinstance(e, Done))
    assert done.text == "Ooh, let me draw!\n\nDone~"
    assert len([e for e in events if isinstance(e, Picture)]) == 1


async def test_a_silent_model_gets_the_caption(
    app: App, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    fake_ollama.queue_tool_call(DRAW_IMAGE, {"prompt": "a paper boat"})
    fake_ollama.queue_reply("")
    events = await converse(app, "draw a boat")
    done, picture = events[-2:]
    assert isinstance(done, Done) and isinstance(picture, Picture)
    assert done.text == picture.caption and "a paper boat" in done.text


# -- refusals: nothing charged, the model is told why ------------------------------------------


async def test_a_guard_refused_drawing_is_not_charged_and_the_model_hears_why(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    async def llama_guard(body: dict[str, Any]) -> str:
        asked = read(str(body["prompt"]))  # the raw Llama Guard prompt, as the model reads it
        text = asked.judged if asked is not None else ""
        return "unsafe\nS1" if "knife" in text else "safe"

    async with FakeOllama(models=["llama-guard3:1b"], responder=llama_guard) as guard:
        on = {"guard_enabled": True, "guard_host": guard.url, "guard_timeout": 2.0}
        async with await start_app(tmp_path, database_url, fake_ollama, **on) as app:
            fake_ollama.queue_tool_call(DRAW_IMAGE, {"prompt": "a knife fight in an alley"})
            fake_ollama.queue_reply("Hmm, I'd better not draw that one.")
            events = await converse(app, "draw me something exciting")

            assert fake_fal.submissions == [], "a refused prompt never reaches Fal"
            assert await app.pool.fetchval("SELECT count(*) FROM ledger WHERE kind='image'") == 0
            result = tool_message(fake_ollama.chat_requests()[-1])["content"]
            assert result == "Not drawn: I can't draw that: it's against the rules here."
            assert not [e for e in events if isinstance(e, Picture)]
            done = events[-1]
            assert isinstance(done, Done) and done.text == "Hmm, I'd better not draw that one."
            [row] = await app.pool.fetch("SELECT status, cost FROM images")
            assert (row["status"], row["cost"]) == ("refused_prompt", 0)


async def test_a_budget_refused_drawing_is_not_charged_and_the_model_hears_why(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    budget = {"budget_monthly_usd": Decimal("0.001")}
    async with await start_app(tmp_path, database_url, fake_ollama, **budget) as app:
        fake_ollama.queue_tool_call(DRAW_IMAGE, FOX)
        fake_ollama.queue_reply("Aww, no more drawings this month.")
        events = await converse(app, "draw me a fox")
        assert fake_fal.submissions == []
        assert await charged(app) == 0
        result = tool_message(fake_ollama.chat_requests()[-1])["content"]
        assert result.startswith("Not drawn: ") and "budget for this month is spent" in result
        assert "Budget" not in result and "Error" not in result, "plain words, no exception"
        assert isinstance(events[-1], Done)
        assert not [e for e in events if isinstance(e, Picture)]


async def test_a_flagged_picture_is_refused_in_every_channel(
    app: App, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    fake_fal.nsfw = True  # Fal's safety checker answers with a black square
    for nsfw in (True, False):
        fake_ollama.queue_tool_call(DRAW_IMAGE, FOX)
        fake_ollama.queue_reply("Oops.")
        events = await converse(app, "draw", nsfw=nsfw)
        assert not [e for e in events if isinstance(e, Picture)]
        result = tool_message(fake_ollama.chat_requests()[-1])["content"]
        assert "can't post here" in result and "weren't charged" in result


# -- when no tool is offered -------------------------------------------------------------------


async def test_no_tools_without_fal_key(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async with await start_app(tmp_path, database_url, fake_ollama, fal_key=None) as app:
        events = await converse(app, "draw me a fox")
        assert isinstance(events[-1], Done)
        [request] = fake_ollama.chat_requests()
        assert not request.get("tools")


async def test_no_tools_for_a_persona_that_does_not_draw(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    personas = personas_with(tmp_path, "draw: false")
    async with await start_app(tmp_path, database_url, fake_ollama, personas_dir=personas) as app:
        assert not (await app.engine.persona_for("test", "c1")).draw
        await converse(app, "draw me a fox")
        [request] = fake_ollama.chat_requests()
        assert not request.get("tools")


async def test_a_model_without_tool_support_is_asked_again_without_tools(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    fake_ollama.models.append("tinychat:1b")
    personas = personas_with(tmp_path, "", model="tinychat:1b")
    async with await start_app(tmp_path, database_url, fake_ollama, personas_dir=personas) as app:
        events = await converse(app, "hello")
        assert isinstance(events[-1], Done) and events[-1].text == "echo: hello"
        first, second = fake_ollama.chat_requests()
        assert fake_ollama.offered_tools(first) == [DRAW_IMAGE]  # Ollama answered 400
        assert not second.get("tools")
        await converse(app, "again")
        assert not fake_ollama.chat_requests()[-1].get("tools"), "remembered: no second 400"


def test_the_local_model_gets_no_tools() -> None:
    local = LocalBrain()
    router = BrainRouter([local])
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "draw"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "x"}}]},
        {"role": "tool", "content": "Drawn.", "tool_name": DRAW_IMAGE},
    ]
    request = ChatRequest("llama3.2:3b", messages, 0.8, 1, 100, 2048, tools=(DRAW_TOOL,))
    plain = router._request_for(local, request)
    assert plain.tools == ()
    assert plain.messages == [
        {"role": "user", "content": "draw"},
        {"role": "system", "content": "(Tool result: Drawn.)"},
    ]


# -- adapters ----------------------------------------------------------------------------------


async def test_the_console_prints_the_picture_path_after_the_reply(
    app: App, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    fake_ollama.queue_tool_call(DRAW_IMAGE, FOX)
    fake_ollama.queue_reply("A fox for you!")
    out, err = io.StringIO(), io.StringIO()
    chat = ConsoleChat(app.engine, app.commands, user="alice", out=out, err=err)
    assert await chat.send("draw me a fox")
    reply, path_line = out.getvalue().splitlines()
    assert reply == "A fox for you!"
    path = Path(path_line)
    assert path.parent == app.settings.data_dir / "images"
    assert await asyncio.to_thread(path.read_bytes) == fake_fal.png
    assert "[Drawing…]" in err.getvalue()


async def test_matrix_uploads_the_picture_after_the_reply(tmp_path: Path) -> None:
    picture = tmp_path / "fox.png"
    sent: list[dict[str, Any]] = []
    attached: list[tuple[Path, bool]] = []

    async def send(content: dict[str, Any], txn: str) -> str:
        sent.append(content)
        return f"$event{len(sent)}"

    async def attach(path: Path, spoiler: bool) -> list[str]:
        attached.append((path, spoiler))
        return ["$file"]

    persona = Persona(name="mimi", display_name="Mimi", description="A cat.", greeting="Hi!")

    async def events() -> AsyncIterator[Event]:
        yield Delta("Here!")
        yield Done("Here!", persona, "a model")
        yield Picture(picture, True, "Mimi drew “a fox”")

    target = ReplyTarget("$asked", None, "m.text", False)
    reply = StreamedReply(target, send, Pacer(0.0), attach=attach)
    await reply.render(events())
    assert [c["body"] for c in sent] == ["Here!"]
    assert attached == [(picture, True)] and reply.files == ["$file"]


async def test_discord_posts_the_picture_as_a_file_with_no_mentions(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    fake_fal: FakeFal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.adapters.discord.test_discord import make_env

    monkeypatch.chdir(tmp_path)  # dpytest keeps each uploaded file as ./dpytest_N.dat
    images = {"fal_key": "test-key", "image_poll_interval": 0.01, "image_timeout": 10.0}
    async for env in make_env(tmp_path, database_url, fake_ollama, **images):
        fake_ollama.queue_tool_call(DRAW_IMAGE, {"prompt": "@everyone a fox"})
        fake_ollama.queue_reply("Here you go!")
        await dpytest.message(f"{env.mention} draw me a fox", env.channel, env.alice)

        with_files = [p for p in env.sent.payloads if p.get("attachments")]
        assert len(with_files) == 1
        [payload] = with_files
        [attachment] = payload["attachments"]
        assert attachment["filename"].endswith(".png")
        assert not attachment["filename"].startswith("SPOILER_")
        assert payload["allowed_mentions"]["parse"] == []
        assert not payload.get("content"), "the picture goes alone, after the reply"
        texts = [p.get("content") for p in env.sent.payloads if p.get("content")]
        assert texts and all(t.startswith("*") or t == "Here you go!" for t in texts)
        assert env.sent.payloads.index(payload) == len(env.sent.payloads) - 1
        stored = backend._cur_config.messages.get(env.channel.id, [])
        assert any(m.get("attachments") for m in stored), "Discord got the file"
        assert await charged(env.app, f"discord:{env.alice.id}") == Decimal("0.003")
        # the file's message is remembered: a reply to it continues the conversation
        file_message = next(m for m in stored if m.get("attachments"))
        assert await env.adapter.messages.lookup(str(file_message["id"])) is not None
