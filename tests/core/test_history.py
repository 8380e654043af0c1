"""History.opening: the conversation row and its recent messages in one round trip, the same
as `conversation` and `recent` read them one after the other."""

from __future__ import annotations

import asyncio

import asyncpg

from bot.app import App
from bot.core.history import History
from bot.core.prompts import HISTORY_ROWS


async def exchange(history: History, conversation_id: int, n: int) -> int | None:
    return await history.append_exchange(
        conversation_id,
        author_id="alice",
        author_name="Alice",
        text=f"question {n}",
        persona="mimi",
        reply=f"answer {n}",
    )


async def test_opening_creates_a_new_conversation_with_no_turns(app: App) -> None:
    history = app.engine.history
    conversation, turns = await history.opening("test", "new")
    assert turns == []
    assert await history.conversation("test", "new") == conversation
    assert (conversation.platform, conversation.external_id) == ("test", "new")


async def test_opening_reads_what_conversation_and_recent_read(app: App) -> None:
    history = app.engine.history
    conversation, _ = await history.opening("test", "c")
    for n in range(3):
        await exchange(history, conversation.id, n)
    other, _ = await history.opening("test", "other")  # another conversation's messages stay out
    await exchange(history, other.id, 99)

    again, turns = await history.opening("test", "c")
    assert again == await history.conversation("test", "c")
    assert turns == await history.recent(conversation.id, since=again.history_from)
    assert [(t.role, t.content) for t in turns] == [
        ("user", "question 0"),
        ("assistant", "answer 0"),
        ("user", "question 1"),
        ("assistant", "answer 1"),
        ("user", "question 2"),
        ("assistant", "answer 2"),
    ]

    third_question = turns[4].id
    assert third_question is not None
    await history.set_window(conversation.id, third_question)  # the window starts there
    again, turns = await history.opening("test", "c")
    assert again.history_from == third_question
    assert [t.content for t in turns] == ["question 2", "answer 2"]
    assert turns == await history.recent(conversation.id, since=third_question)


async def test_opening_reads_at_most_the_history_rows_newest_kept(app: App) -> None:
    history = app.engine.history
    conversation, _ = await history.opening("test", "long")
    for n in range(HISTORY_ROWS // 2 + 1):  # one exchange (two rows) more than it reads
        await exchange(history, conversation.id, n)
    _, turns = await history.opening("test", "long")
    assert len(turns) == HISTORY_ROWS
    assert turns[0].content == "question 1" and turns[-1].content == f"answer {HISTORY_ROWS // 2}"
    assert turns == await history.recent(conversation.id)


async def test_openings_asked_at_once_each_read_their_own(app: App) -> None:
    """Openings made while one is being read go in one statement (`Together`): each still gets
    its own conversation and messages, and a conversation seen for the first time is made."""
    history = app.engine.history
    for n in range(6):
        conversation, _ = await history.opening("test", f"t{n}")
        for k in range(n):
            await exchange(history, conversation.id, k)
    opened = await asyncio.gather(*(history.opening("test", f"t{n}") for n in range(8)))
    for n, (conversation, turns) in enumerate(opened):
        assert conversation == await history.conversation("test", f"t{n}")
        assert conversation.external_id == f"t{n}"
        assert turns == await history.recent(conversation.id, since=conversation.history_from)
        assert [t.content for t in turns[::2]] == [
            f"question {k}" for k in range(n if n < 6 else 0)
        ]


async def test_new_conversations_seen_at_once_are_made_together_each_its_own(app: App) -> None:
    """First messages of many new conversations at once (a burst of DMs): their rows are
    written together, each caller gets its own, a conversation asked twice in one batch is made
    once, and asking again finds the same rows."""
    history = app.engine.history
    sent: list[int] = []  # the keys each INSERT of conversations carried
    counting = app.pool

    class Counting:
        async def fetch(self, *args: object) -> object:
            if "INSERT INTO conversations" in str(args[0]):
                sent.append(len(args[1]))  # type: ignore[arg-type]
            return await counting.fetch(*args)

        async def fetchrow(self, *args: object) -> object:
            if "INSERT INTO conversations" in str(args[0]):
                sent.append(1)
            return await counting.fetchrow(*args)

    fresh = History(Counting())
    names = [f"dm{n}" for n in range(20)] + ["dm3"]
    made = await asyncio.gather(*(fresh.opening("test", name) for name in names))
    assert [c.external_id for c, _ in made] == names
    assert all(turns == [] for _, turns in made)
    assert made[3][0] == made[-1][0], "asked twice at once: one row"
    assert len({c.id for c, _ in made}) == 20
    # the first alone, then those asked meanwhile: a few statements, not one each
    assert sum(sent) == len(names) and len(sent) <= 3, sent
    for name, (conversation, _) in zip(names, made, strict=True):
        assert await history.conversation("test", name) == conversation


class _CountingAppends:
    """The app's pool, counting the rows each INSERT of messages carried."""

    def __init__(self, pool: object, sent: list[int]) -> None:
        self._pool = pool
        self._sent = sent

    def _count(self, query: object, args: tuple[object, ...]) -> None:
        if "INSERT INTO messages" in str(query):
            many = isinstance(args[0], list)
            self._sent.append(len(args[0]) if many else 1)  # type: ignore[arg-type]

    async def fetch(self, query: object, *args: object) -> object:
        self._count(query, args)
        return await self._pool.fetch(query, *args)  # type: ignore[attr-defined]

    async def execute(self, query: object, *args: object) -> object:
        self._count(query, args)
        return await self._pool.execute(query, *args)  # type: ignore[attr-defined]


async def test_exchanges_ended_at_once_are_written_together_each_in_order(app: App) -> None:
    """Replies of many conversations that end at once (a burst): their exchanges go in a few
    statements, not one each; each caller gets its own message's row id, each conversation's
    rows are in order (the message before its reply), and a reply to another persona's words
    (`heard=False`) adds only the reply."""
    history = app.engine.history
    sent: list[int] = []
    fresh = History(_CountingAppends(app.pool, sent))
    conversations = [(await history.opening("test", f"burst{n}"))[0] for n in range(24)]

    async def append(n: int) -> int | None:
        return await fresh.append_exchange(
            conversations[n].id,
            author_id=f"user{n}",
            author_name=f"User {n}",
            text=f"question {n}",
            persona="mimi",
            reply=f"answer {n}",
            message_id=f"m{n}",
            heard=n % 5 != 4,
        )

    rows = await asyncio.gather(*(append(n) for n in range(24)))
    assert len(sent) <= 3, sent  # the first alone, then those that came meanwhile
    for n, conversation in enumerate(conversations):
        turns = await history.recent(conversation.id)
        if n % 5 == 4:
            assert rows[n] is None
            assert [(t.role, t.content) for t in turns] == [("assistant", f"answer {n}")]
            continue
        assert [(t.role, t.author_name, t.content) for t in turns] == [
            ("user", f"User {n}", f"question {n}"),
            ("assistant", "mimi", f"answer {n}"),
        ]
        assert rows[n] == turns[0].id and turns[0].id < turns[1].id  # type: ignore[operator]
    platform_ids = await app.pool.fetch(
        "SELECT conversation_id, role, author_id, platform_message_id FROM messages"
        " WHERE conversation_id = ANY($1) ORDER BY id",
        [c.id for c in conversations],
    )
    by_conversation = {c.id: n for n, c in enumerate(conversations)}
    for row in platform_ids:
        n = by_conversation[row["conversation_id"]]
        assert row["platform_message_id"] == f"m{n}"
        assert row["author_id"] == (f"user{n}" if row["role"] == "user" else "mimi")


async def test_an_exchange_that_cannot_be_written_fails_alone(app: App) -> None:
    """One exchange of a batch whose conversation is gone (deleted meanwhile): its caller gets
    the database's error, and the others are written, each once."""
    history = app.engine.history
    sent: list[int] = []
    fresh = History(_CountingAppends(app.pool, sent))
    conversations = [(await history.opening("test", f"gone{n}"))[0].id for n in range(6)]
    conversations[3] = 10**12  # no such conversation

    async def append(conversation_id: int) -> int | None:
        return await fresh.append_exchange(
            conversation_id,
            author_id="alice",
            author_name="Alice",
            text="question",
            persona="mimi",
            reply="answer",
        )

    outcomes = await asyncio.gather(*(append(c) for c in conversations), return_exceptions=True)
    assert isinstance(outcomes[3], asyncpg.ForeignKeyViolationError), outcomes[3]
    assert any(count > 1 for count in sent), "the others went together first"
    for n, conversation_id in enumerate(conversations):
        if n == 3:
            continue
        turns = await history.recent(conversation_id)
        assert [t.content for t in turns] == ["question", "answer"]
        assert outcomes[n] == turns[0].id
