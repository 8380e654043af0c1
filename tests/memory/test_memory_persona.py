"""Memories per persona (issue 21, point 4): in a cast, what one persona learns about a member
it alone recalls, unless it shares its memories (`share_memories: true`); facts from before
(no keeper) stay shared. Recall, extraction, `/memories`, `forget` and the export all follow it.

The real engine and Postgres; the chat model is the fake Ollama on loopback (its embeddings of
the same text are the same vector, so a fact said again is recalled at similarity 1)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.app import App, running_app
from bot.core.commands import CommandContext
from bot.core.engine import Incoming
from bot.memory.store import NewFact, scope_of
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama
from tests.memory.test_memory import exchange, extraction_requests, facts, memory_of
from tests.memory.test_memory_scope import said
from tests.test_cli import base_env, run_bot

OBOE = "Plays the oboe."
HERE = CommandContext("test", "stage", "alice", "Alice", guild="g1")


def to(persona: str, text: str) -> Incoming:
    """Alice, in a channel of server g1, speaking to one member of the cast."""
    return Incoming("test", "stage", "alice", "Alice", text, guild="g1", persona=persona)


def _persona(folder: Path, name: str, extra: str = "") -> None:
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\ndisplay_name: {name.title()}\ndescription: d\ngreeting: g\n{extra}"
    )


@pytest.fixture
async def cast(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[App]:
    personas = tmp_path / "personas"
    personas.mkdir()
    _persona(personas, "luna")
    _persona(personas, "sol")
    _persona(personas, "echo", "share_memories: true\n")
    settings = make_settings(
        tmp_path, database_url, fake_ollama.url, memory_enabled=True, personas_dir=personas
    )
    async with running_app(settings) as app:
        yield app


async def _ids(app: App) -> dict[str, int]:
    rows = await app.pool.fetch("SELECT id, text FROM memories WHERE superseded_by IS NULL")
    return {r["text"]: r["id"] for r in rows}


async def test_a_persona_keeps_what_it_learns(cast: App, fake_ollama: FakeOllama) -> None:
    await exchange(cast, fake_ollama, to("luna", "I play the oboe"), facts(OBOE))
    keeper = await cast.pool.fetchval("SELECT private_to FROM memories WHERE text = $1", OBOE)
    assert keeper == "luna"
    assert OBOE in await said(cast, fake_ollama, to("luna", OBOE)), "luna recalls it"
    assert OBOE not in await said(cast, fake_ollama, to("sol", OBOE)), "sol, in the same cast, not"
    assert OBOE not in await said(cast, fake_ollama, to("echo", OBOE)), "nor a sharing persona"
    listed = await cast.commands.run(HERE, "memories", [])
    assert f"{OBOE} (only luna remembers this)" in listed.text, "the member sees every fact"


async def test_a_sharing_persona_gives_what_it_learns_to_the_cast(
    cast: App, fake_ollama: FakeOllama
) -> None:
    await exchange(cast, fake_ollama, to("echo", "I play the oboe"), facts(OBOE))
    keeper = await cast.pool.fetchval("SELECT private_to FROM memories WHERE text = $1", OBOE)
    assert keeper is None
    assert OBOE in await said(cast, fake_ollama, to("luna", OBOE))
    assert OBOE in await said(cast, fake_ollama, to("sol", OBOE))
    listed = await cast.commands.run(HERE, "memories", [])
    assert OBOE in listed.text and "only" not in listed.text


async def test_facts_from_before_personas_kept_them_stay_shared(
    cast: App, fake_ollama: FakeOllama
) -> None:
    memory = memory_of(cast)
    embedded = await memory.embeddings.embed([OBOE])
    fact = NewFact(OBOE, embedded.vectors[0])
    scope = scope_of("test", "stage", "g1")
    await memory.store.add("test:alice", [fact], model=embedded.model, persona=None, scope=scope)
    for persona in ("luna", "sol", "echo"):
        assert OBOE in await said(cast, fake_ollama, to(persona, OBOE)), persona


async def test_extraction_sees_only_what_the_persona_recalls(
    cast: App, fake_ollama: FakeOllama
) -> None:
    await exchange(cast, fake_ollama, to("echo", "I live in Lisbon"), facts("Lives in Lisbon."))
    await exchange(cast, fake_ollama, to("sol", "I play the oboe"), facts(OBOE))
    oboe = (await _ids(cast))[OBOE]
    await exchange(cast, fake_ollama, to("luna", "no more oboe"), facts(("Quit music.", [oboe])))
    shown = extraction_requests(fake_ollama)[-1]["messages"][0]["content"]
    assert "Lives in Lisbon." in shown, "luna is shown the shared facts"
    assert OBOE not in shown, "never sol's own"
    assert OBOE in await _ids(cast), "nor can it replace them"
    assert OBOE in await said(cast, fake_ollama, to("sol", OBOE))


async def test_an_update_of_a_shared_fact_stays_shared(cast: App, fake_ollama: FakeOllama) -> None:
    await exchange(cast, fake_ollama, to("echo", "I live in Lisbon"), facts("Lives in Lisbon."))
    lisbon = (await _ids(cast))["Lives in Lisbon."]
    moved = facts(("Lives in Porto.", [lisbon]), "Likes trams.")
    await exchange(cast, fake_ollama, to("luna", "I moved to Porto, trams!"), moved)
    rows = await cast.pool.fetch(
        "SELECT text, private_to FROM memories WHERE superseded_by IS NULL ORDER BY id"
    )
    assert {(r["text"], r["private_to"]) for r in rows} == {
        ("Lives in Porto.", None),
        ("Likes trams.", "luna"),
    }, "the update replaced what every persona recalled; the new fact is luna's"
    assert "Lives in Porto." in await said(cast, fake_ollama, to("sol", "Lives in Porto."))
    assert "Likes trams." not in await said(cast, fake_ollama, to("sol", "Likes trams."))


async def test_the_same_fact_is_kept_by_each_persona_that_learns_it(
    cast: App, fake_ollama: FakeOllama
) -> None:
    await exchange(cast, fake_ollama, to("luna", "I play the oboe"), facts(OBOE))
    await exchange(cast, fake_ollama, to("sol", "oboe, yes"), facts(OBOE))
    keepers = await cast.pool.fetch("SELECT id, private_to FROM memories ORDER BY id")
    assert [r["private_to"] for r in keepers] == ["luna", "sol"]
    await cast.commands.run(HERE, "forget", [str(keepers[0]["id"])])
    assert OBOE not in await said(cast, fake_ollama, to("luna", OBOE)), "luna's copy is gone"
    assert OBOE in await said(cast, fake_ollama, to("sol", OBOE)), "sol's is not"
    await exchange(cast, fake_ollama, to("echo", "oboe!"), facts(OBOE))
    await exchange(cast, fake_ollama, to("luna", "oboe again"), facts(OBOE))
    rows = await cast.pool.fetch("SELECT private_to FROM memories ORDER BY id")
    assert [r["private_to"] for r in rows] == ["sol", None], "shared already: not kept twice"


async def test_export_names_the_keeper_and_filters_by_persona(
    tmp_path: Path, cast: App, database_url: str, fake_ollama: FakeOllama
) -> None:
    await exchange(cast, fake_ollama, to("luna", "I play the oboe"), facts(OBOE))
    await exchange(cast, fake_ollama, to("echo", "I live in Oslo"), facts("Lives in Oslo."))
    env = base_env(tmp_path, database_url, fake_ollama.url) | {"MEMORY_ENABLED": "true"}
    code, out, err = await run_bot("memories", "export", "--user", "test:alice", env=env)
    assert code == 0, err
    rows = json.loads(out)["memories"]
    assert {(m["text"], m["private_to"]) for m in rows} == {
        (OBOE, "luna"),
        ("Lives in Oslo.", None),
    }
    args = ("memories", "export", "--user", "test:alice", "--persona", "sol")
    code, out, err = await run_bot(*args, env=env)
    assert code == 0, err
    assert [m["text"] for m in json.loads(out)["memories"]] == ["Lives in Oslo."]
