"""A cast of personas: the commands (real Postgres), who speaks, and each persona's view."""

from __future__ import annotations

import pytest

from bot.app import App
from bot.core.attention import Attention
from bot.core.cast import Said, Stage, view_for, who_speaks
from bot.core.commands import CommandContext
from bot.core.engine import Done, Incoming
from bot.core.personas import Persona
from bot.core.prompts import Turn
from bot.errors import CommandError
from tests.fakes.ollama import FakeOllama


def ctx(*, admin: bool = True, conversation: str = "c1") -> CommandContext:
    return CommandContext("test", conversation, "alice", "Alice", is_admin=admin)


def persona(name: str, **fields: object) -> Persona:
    values: dict[str, object] = {
        "name": name,
        "display_name": name.title(),
        "description": "someone",
        "greeting": "hi",
    }
    values.update(fields)
    return Persona.model_validate(values)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Dice:
    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


MIMI = persona("mimi", aliases=["Whiskers"])
SAGE = persona("sage")
CAST = [MIMI, SAGE]


def names(choices: list[object]) -> list[str]:
    return [c.persona.name for c in choices]  # type: ignore[attr-defined]


# --- the cast, stored and changed through the command layer ---------------------------------


async def test_cast_of_one_by_default_then_add_and_remove(app: App) -> None:
    listing = await app.commands.run(ctx(), "persona", ["cast"])
    alone = app.engine.persona_named(None)
    assert "(1)" in listing.text and alone.name in listing.text
    other = "sage" if alone.name != "sage" else "mimi"
    added = await app.commands.run(ctx(), "persona", ["cast", "add", other])
    assert "joins the cast" in added.text
    cast = await app.engine.cast_for("test", "c1")
    assert [p.name for p in cast] == [alone.name, other]
    assert [p.name for p in await app.engine.cast_for("test", "elsewhere")] == [alone.name]
    again = await app.commands.run(ctx(), "persona", ["cast", "add", other])
    assert "already" in again.text
    removed = await app.commands.run(ctx(), "persona", ["cast", "remove", alone.name])
    assert "leaves" in removed.text
    assert [p.name for p in await app.engine.cast_for("test", "c1")] == [other]
    with pytest.raises(CommandError, match="whole cast"):
        await app.commands.run(ctx(), "persona", ["cast", "remove", other])


async def test_switching_persona_makes_a_cast_of_one(app: App) -> None:
    await app.commands.run(ctx(), "persona", ["cast", "add", "sage"])
    await app.commands.run(ctx(), "persona", ["cast", "add", "mimi"])
    assert len(await app.engine.cast_for("test", "c1")) == 2
    await app.commands.run(ctx(), "persona", ["sage"])
    assert [p.name for p in await app.engine.cast_for("test", "c1")] == ["sage"]


async def test_cast_command_errors_are_plain(app: App) -> None:
    with pytest.raises(CommandError, match="Only an admin"):
        await app.commands.run(ctx(admin=False), "persona", ["cast", "add", "sage"])
    with pytest.raises(CommandError, match=r"no persona called 'nobody'"):
        await app.commands.run(ctx(), "persona", ["cast", "add", "nobody"])
    with pytest.raises(CommandError, match="Usage: persona cast"):
        await app.commands.run(ctx(), "persona", ["cast", "invite", "sage"])
    other = "sage" if app.engine.persona_named(None).name != "sage" else "mimi"
    with pytest.raises(CommandError, match="not in the cast"):
        await app.commands.run(ctx(), "persona", ["cast", "remove", other])


# --- who speaks ---------------------------------------------------------------------------------


def test_named_persona_answers_alone() -> None:
    attention = Attention(clock=Clock(), rng=Dice(0.0))
    assert names(who_speaks(CAST, Said("Sage, what is 2+2?"), attention, "k")) == ["sage"]
    assert names(who_speaks(CAST, Said("whiskers come here"), attention, "k")) == ["mimi"]
    both = who_speaks(CAST, Said("Mimi and Sage, hello"), attention, "k")
    assert names(both) == ["mimi", "sage"]
    replied = who_speaks(CAST, Said("really?", reply_to="sage"), attention, "k")
    assert names(replied) == ["sage"]


def test_unaddressed_gets_at_most_one_by_attention() -> None:
    clock = Clock()
    attention = Attention(clock=clock, rng=Dice(0.0))  # every roll under the chance follows
    assert who_speaks(CAST, Said("nice weather"), attention, "k") == []  # nobody is listening
    who_speaks(CAST, Said("Mimi?"), attention, "k")
    clock.now += 100
    who_speaks(CAST, Said("Sage?"), attention, "k")  # Sage addressed later: more attentive
    follow = who_speaks(CAST, Said("and then?"), attention, "k")
    assert names(follow) == ["sage"]
    quiet = Attention(clock=clock, rng=Dice(0.99))
    who_speaks(CAST, Said("Mimi?"), quiet, "k")
    assert who_speaks(CAST, Said("and then?"), quiet, "k") == []


def test_mention_of_the_bot() -> None:
    attention = Attention(clock=Clock(), rng=Dice(0.99))
    one = who_speaks(CAST, Said("hello", mentioned=True), attention, "k")
    assert len(one) == 1  # a cast: exactly one answers
    alone = who_speaks([MIMI], Said("hello", mentioned=True), attention, "k2")
    assert names(alone) == ["mimi"]  # a cast of one: a mention counts, as before
    assert who_speaks([MIMI], Said("hello"), Attention(rng=Dice(0.99)), "k3") == []
    dm = Said("hello", is_dm=True)
    assert len(who_speaks(CAST, dm, attention, "k4")) == 1
    assert who_speaks(CAST, dm, attention, "k4", answer_dms=False) == []
    assert who_speaks(CAST, Said("Sage?", from_bot=True), attention, "k5") == []


def test_persona_turns_stop_at_the_budget_and_never_self() -> None:
    attention = Attention(clock=Clock(), rng=Dice(0.0))
    first = Said("Sage, what do you think?", author="mimi", turn=1)
    assert names(who_speaks(CAST, first, attention, "k")) == ["sage"]
    over = Said("Sage, what do you think?", author="mimi", turn=2)
    assert who_speaks(CAST, over, attention, "k") == []  # default max_persona_turns: 2
    chatty = [MIMI, persona("sage", max_persona_turns=3)]
    assert names(who_speaks(chatty, over, attention, "k")) == ["sage"]
    selfish = Said("Mimi says hi", author="mimi", turn=1)
    assert who_speaks([MIMI], selfish, attention, "k") == []


def test_stage_claims_once_and_remembers_authors() -> None:
    stage = Stage(limit=2)
    assert stage.claim("m1", "sage") and not stage.claim("m1", "sage")
    assert stage.claim("m1", "mimi")
    stage.wrote("r1", "mimi", 1)
    assert stage.author("r1") == ("mimi", 1) and stage.author("nope") is None
    stage.wrote("r2", "sage", 2)
    stage.wrote("r3", "sage", 3)
    assert stage.author("r1") is None  # bounded


def test_view_names_other_personas() -> None:
    turns = [
        Turn("user", "Alice", "hi both"),
        Turn("assistant", "mimi", "nya!"),
        Turn("assistant", "sage", "Hello, Alice."),
    ]
    seen = view_for(MIMI, turns, lambda n: n.title())
    assert seen == [turns[0], turns[1], Turn("user", "Sage", "Hello, Alice.")]
    heard = view_for(MIMI, turns, lambda n: n.title(), heard_from="sage")
    assert heard == turns[:2]


# --- the engine answers as a cast member, sees who said what --------------------------------


async def test_engine_answers_as_the_chosen_member(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.queue_reply("Hello from Sage.")
    events = [
        e
        async for e in app.engine.handle(
            Incoming("test", "c9", "alice", "Alice", "hi all", persona="sage")
        )
    ]
    assert any(isinstance(e, Done) and e.persona.name == "sage" for e in events)
    fake_ollama.queue_reply("Mimi agrees.")
    reply = Incoming(
        "test",
        "c9",
        "persona:sage",
        "Sage",
        "Hello from Sage.",
        persona="mimi",
        from_persona="sage",
    )
    events = [e async for e in app.engine.handle(reply)]
    assert any(isinstance(e, Done) and e.persona.name == "mimi" for e in events)
    messages = fake_ollama.chat_requests()[-1]["messages"][1:]
    assert [m["content"] for m in messages] == ["Alice: hi all", "Sage: Hello from Sage."]
    conversation = await app.engine.conversation("test", "c9")
    rows = await app.engine.history.recent(conversation.id)
    assert [(t.role, t.author_name, t.content) for t in rows] == [
        ("user", "Alice", "hi all"),
        ("assistant", "sage", "Hello from Sage."),
        ("assistant", "mimi", "Mimi agrees."),
    ]


async def test_a_second_member_answering_one_message_stores_it_once(
    app: App, fake_ollama: FakeOllama
) -> None:
    first = Incoming("test", "c8", "alice", "Alice", "hi all", persona="sage")
    fake_ollama.queue_reply("Hello from Sage.")
    [e async for e in app.engine.handle(first)]
    fake_ollama.queue_reply("Nya, hi Alice.")
    again = Incoming("test", "c8", "alice", "Alice", "hi all", persona="mimi", repeat=True)
    [e async for e in app.engine.handle(again)]
    messages = fake_ollama.chat_requests()[-1]["messages"][1:]
    assert [m["content"] for m in messages] == ["Sage: Hello from Sage.", "Alice: hi all"]
    conversation = await app.engine.conversation("test", "c8")
    rows = await app.engine.history.recent(conversation.id)
    assert [(t.role, t.author_name) for t in rows] == [
        ("user", "Alice"),
        ("assistant", "sage"),
        ("assistant", "mimi"),
    ]
