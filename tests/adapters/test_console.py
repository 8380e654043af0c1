"""The terminal chat plays a cast: the real engine, Postgres and the shipped mimi and sage, the
fake Ollama. Each persona that speaks gets a line under its name; persona turns stop at the
budget; a message naming nobody gets one answer; a cast of one prints as before."""

from __future__ import annotations

import io

from bot.adapters.console import PLATFORM, ConsoleChat
from bot.app import App
from tests.fakes.ollama import FakeOllama


async def cast_chat(app: App) -> tuple[ConsoleChat, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    chat = ConsoleChat(app.engine, app.commands, user="alice", out=out, err=err)
    assert await chat.command("/persona mimi", quiet=True)
    assert await chat.command("/persona cast add sage", quiet=True)
    return chat, out, err


async def test_each_persona_speaks_under_its_name_within_the_budget(
    app: App, fake_ollama: FakeOllama
) -> None:
    chat, out, _ = await cast_chat(app)
    fake_ollama.queue_reply("Sage, what do you think?")
    fake_ollama.queue_reply("Mimi, fish is fine.")
    fake_ollama.queue_reply("Sage, are you sure?")  # turn 3: over the budget of 2
    assert await chat.send("Mimi, what shall we cook?")
    assert out.getvalue().splitlines() == [
        "Mimi: Sage, what do you think?",
        "Sage: Mimi, fish is fine.",
    ]
    requests = fake_ollama.chat_requests()
    assert len(requests) == 2
    assert "Sage" in requests[1]["messages"][0]["content"], "the second answer is Sage's"
    conversation = await app.engine.conversation(PLATFORM, "alice")
    turns = await app.engine.history.recent(conversation.id)
    assert [(t.role, t.author_name) for t in turns] == [
        ("user", "alice"),
        ("assistant", "mimi"),
        ("assistant", "sage"),
    ]


async def test_a_message_naming_nobody_gets_one_answer(app: App, fake_ollama: FakeOllama) -> None:
    chat, out, _ = await cast_chat(app)
    fake_ollama.queue_reply("Hello to you too.")
    fake_ollama.queue_reply("And from me.")
    assert await chat.send("hello there")
    [line] = out.getvalue().splitlines()
    assert line in {"Mimi: Hello to you too.", "Sage: Hello to you too."}
    assert len(fake_ollama.chat_requests()) == 1


async def test_a_cast_of_one_prints_the_reply_alone(app: App, fake_ollama: FakeOllama) -> None:
    out, err = io.StringIO(), io.StringIO()
    chat = ConsoleChat(app.engine, app.commands, user="bob", out=out, err=err)
    fake_ollama.queue_reply("Just me.")
    assert await chat.send("hello")
    assert out.getvalue() == "Just me.\n"
    assert "answered by" in err.getvalue()


async def test_persona_list_shows_the_cast(app: App) -> None:
    chat, out, _ = await cast_chat(app)
    assert await chat.command("/persona")
    lines = out.getvalue().splitlines()
    assert lines[0] == "The cast here: Mimi (mimi), Sage (sage). Personas:"
    assert "* mimi: Mimi" in lines and "* sage: Sage" in lines
    assert await chat.command("/persona sage", quiet=True)  # a cast of one again
    out.truncate(0)
    out.seek(0)
    assert await chat.command("/persona")
    lines = out.getvalue().splitlines()
    assert lines[0] == "Talking with Sage (sage). Personas:"
    assert "- mimi: Mimi" in lines and "* sage: Sage" in lines
