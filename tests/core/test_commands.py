import pytest

from bot.app import App
from bot.core.commands import CommandContext, parse
from bot.errors import CommandError


def ctx(*, admin: bool = True, conversation: str = "c1") -> CommandContext:
    return CommandContext("test", conversation, "alice", "Alice", is_admin=admin)


def test_parse() -> None:
    assert parse("/persona sage") == ("persona", ["sage"])
    assert parse("!persona  sage", prefix="!") == ("persona", ["sage"])
    assert parse('/imagine "a red fox"') == ("imagine", ["a red fox"])
    assert parse("hello /persona") is None
    assert parse("/") is None


async def test_help_lists_commands(app: App) -> None:
    result = await app.commands.run(ctx(), "help", [])
    for name in ("help", "persona", "reset"):
        assert name in result.text


async def test_persona_list_and_switch(app: App) -> None:
    listing = await app.commands.run(ctx(), "persona", [])
    assert "mimi" in listing.text and "sage" in listing.text
    switched = await app.commands.run(ctx(), "persona", ["Sage"])
    sage = app.engine.personas.get("sage")
    assert sage.greeting in switched.text
    assert (await app.engine.persona_for("test", "c1")).name == "sage"
    assert (await app.engine.persona_for("test", "other")).name != "sage" or (
        app.engine.persona_named(None).name == "sage"
    )


async def test_persona_errors_are_plain(app: App) -> None:
    with pytest.raises(CommandError, match=r"no persona called 'nobody'.*mimi"):
        await app.commands.run(ctx(), "persona", ["nobody"])
    with pytest.raises(CommandError, match="Only an admin"):
        await app.commands.run(ctx(admin=False), "persona", ["sage"])
    with pytest.raises(CommandError, match="no command 'nope'"):
        await app.commands.run(ctx(), "nope", [])


async def test_reset_forgets_history(app: App, fake_ollama) -> None:  # type: ignore[no-untyped-def]
    from bot.core.engine import Incoming

    fake_ollama.queue_reply("remembered")
    async for _ in app.engine.handle(Incoming("test", "c1", "alice", "Alice", "remember me")):
        pass
    result = await app.commands.run(ctx(), "reset", [])
    assert "2 messages" in result.text
    conversation = await app.engine.conversation("test", "c1")
    assert await app.engine.history.recent(conversation.id) == []
    fake_ollama.queue_reply("fresh")
    async for _ in app.engine.handle(Incoming("test", "c1", "alice", "Alice", "who am I?")):
        pass
    contents = [m["content"] for m in fake_ollama.chat_requests()[-1]["messages"][1:]]
    assert contents == ["who am I?"]
