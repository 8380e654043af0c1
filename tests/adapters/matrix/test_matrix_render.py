"""Matrix reply rendering: sanitised HTML, stable transaction ids, paced edits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from bot.adapters.matrix.faces import PROFILE, Face, profile_id
from bot.adapters.matrix.pacing import Pacer, Pacers
from bot.adapters.matrix.render import ReplyTarget, StreamedReply, to_html, transaction_id
from bot.core.engine import Delta, Done, Event, Failed, Notice
from bot.core.personas import Persona


def test_markdown_becomes_html_and_model_markup_does_not() -> None:
    html = to_html("**hi** `code`\n\n- one\n- two\n\n<script>alert(1)</script>")
    assert "<strong>hi</strong>" in html and "<code>code</code>" in html
    assert "<li>one</li>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript' not in to_html("[click](javascript:alert(1))")
    assert "<img" not in to_html("<img src=x onerror=alert(1)>")
    assert "<img" not in to_html("![x](https://example.org/x.png)")
    assert 'href="https://example.org"' in to_html("[site](https://example.org)")


def test_transaction_ids_are_stable_per_event_and_step() -> None:
    assert transaction_id("$a:hs", "first") == transaction_id("$a:hs", "first")
    assert transaction_id("$a:hs", "first") != transaction_id("$b:hs", "first")
    assert transaction_id("$a:hs", "first") != transaction_id("$a:hs", "edit1")
    assert all(c.isalnum() or c == "-" for c in transaction_id("$a/b?c:hs", "x"))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _events(clock: _Clock, items: list[tuple[float, Event]]) -> AsyncIterator[Event]:
    for at, event in items:
        clock.now = at
        yield event


def _persona() -> Persona:
    return Persona(name="p", display_name="P", description="d", greeting="g")


async def test_stream_sends_once_then_edits_at_most_once_per_interval() -> None:
    clock = _Clock()
    sent: list[tuple[dict[str, Any], str]] = []

    async def send(content: dict[str, Any], txn: str, *, droppable: bool = False) -> str:
        sent.append((content, txn))
        return "$reply"

    target = ReplyTarget("$asked", None, "m.notice", True)
    reply = StreamedReply(target, send, Pacer(1.0, clock))
    words = [(0.1 * i, Delta(f"w{i} ")) for i in range(25)]  # 2.5 s of words
    done = (2.5, Done("".join(f"w{i} " for i in range(25)).strip(), _persona(), "test"))
    await reply.render(_events(clock, [*words, done]))
    first, *edits = sent
    assert first[0]["body"] == "w0" and first[0]["m.relates_to"]["m.in_reply_to"]
    assert 2 <= len(edits) <= 3
    assert edits[-1][0]["m.new_content"]["body"] == done[1].text
    assert len({txn for _, txn in sent}) == len(sent)


async def test_whole_reply_is_sent_once_and_failure_is_a_notice() -> None:
    clock = _Clock()
    sent: list[dict[str, Any]] = []

    async def send(content: dict[str, Any], txn: str, *, droppable: bool = False) -> str:
        sent.append(content)
        return f"$e{len(sent)}"

    target = ReplyTarget("$asked", "$root", "m.text", False)
    await StreamedReply(target, send, Pacer(1.0, clock)).render(
        _events(clock, [(0, Delta("a ")), (0, Delta("b")), (0, Done("a b", _persona(), "t"))])
    )
    assert [c["body"] for c in sent] == ["a b"]
    assert sent[0]["m.relates_to"]["rel_type"] == "m.thread"
    sent.clear()
    await StreamedReply(target, send, Pacer(1.0, clock)).render(
        _events(clock, [(0, Failed("Sorry."))])
    )
    assert sent[0]["msgtype"] == "m.notice" and sent[0]["body"] == "Sorry."


async def test_wake_notice_is_shown_then_replaced_by_the_reply() -> None:
    clock = _Clock()
    sent: list[tuple[dict[str, Any], str]] = []

    async def send(content: dict[str, Any], txn: str, *, droppable: bool = False) -> str:
        sent.append((content, txn))
        return "$reply"

    target = ReplyTarget("$asked", None, "m.notice", False)
    events = [
        (0.0, Notice("ollama:10.0.0.5 is down", user_text=None)),  # operator-only: not shown
        (0.0, Notice("Waking up gpu…", user_text="Waking up gpu…")),
        (2.0, Delta("Morning!")),
        (2.0, Done("Morning!", _persona(), "t")),
    ]
    await StreamedReply(target, send, Pacer(1.0, clock)).render(_events(clock, events))
    assert [c["body"] for c, _ in sent] == ["*Waking up gpu…*", "* Morning!"]
    assert sent[1][0]["m.new_content"]["body"] == "Morning!"
    assert "10.0.0.5" not in str(sent)


async def test_a_withheld_reply_is_redacted_with_its_edits_then_the_notice_is_posted() -> None:
    clock = _Clock()
    sent: list[dict[str, Any]] = []
    redacted: list[str] = []

    async def send(content: dict[str, Any], txn: str, *, droppable: bool = False) -> str:
        sent.append(content)
        return f"$e{len(sent)}"

    async def redact(event_id: str, txn: str) -> None:
        redacted.append(event_id)

    target = ReplyTarget("$asked", None, "m.text", True)
    events = [
        (0.0, Delta("Fine start.\n\n")),
        (1.5, Delta("More fine words.")),
        (2.0, Failed("Withheld: S10 Hate.", retract=True)),
    ]
    reply = StreamedReply(target, send, Pacer(1.0, clock), redact=redact)
    await reply.render(_events(clock, events))
    assert [c["body"] for c in sent[:2]] == ["Fine start.", "* Fine start.\n\nMore fine words."]
    assert redacted == ["$e2", "$e1"], "the edit and the original, newest first"
    notice = sent[-1]
    assert notice["body"] == "Withheld: S10 Hate." and notice["msgtype"] == "m.notice"
    assert "m.new_content" not in notice and reply.event_id == "$e3"


def test_the_pacer_doubles_on_a_limit_and_honours_retry_after() -> None:
    clock = _Clock()
    pacer = Pacer(2.0, clock)
    assert pacer.edit_due()
    pacer.edited()
    clock.now = 1.9
    assert not pacer.edit_due()
    clock.now = 2.0
    assert pacer.edit_due()
    assert pacer.limited(5000) == 5.0
    assert pacer.interval == 4.0
    clock.now = 6.9
    assert not pacer.edit_due(), "not before retry_after_ms"
    clock.now = 7.0
    assert pacer.edit_due()
    for _ in range(10):
        pacer.limited(None)
    assert pacer.interval == 60.0, "capped"
    pacer.succeeded()
    assert 2.0 < pacer.interval < 60.0, "eases back after a success"


def test_a_limit_met_in_one_room_holds_back_edits_in_every_room() -> None:
    """Synapse's rc_message counts per account, not per room."""
    clock = _Clock()
    pacers = Pacers(2.0, clock)
    assert pacers("!a:hs").edit_due() and pacers("!b:hs").edit_due()
    pacers("!a:hs").edited()
    assert not pacers("!b:hs").edit_due(), "an edit in one room spends the account's pace"
    clock.now = 2.0
    pacers("!a:hs").limited(5000)
    assert not pacers("!b:hs").edit_due()
    clock.now = 7.0
    assert pacers("!b:hs").edit_due()


async def test_edits_stop_at_the_cap_but_the_final_text_lands() -> None:
    clock = _Clock()
    sent: list[tuple[dict[str, Any], bool]] = []

    async def send(content: dict[str, Any], txn: str, *, droppable: bool = False) -> str:
        sent.append((content, droppable))
        return "$reply"

    target = ReplyTarget("$asked", None, "m.text", True, max_edits=2)
    words = [(float(i), Delta(f"w{i} ")) for i in range(10)]
    final = Done("".join(f"w{i} " for i in range(10)).strip(), _persona(), "t")
    await StreamedReply(target, send, Pacer(1.0, clock)).render(
        _events(clock, [*words, (10.0, final)])
    )
    assert [droppable for _, droppable in sent] == [False, True, True, False]
    assert sent[-1][0]["m.new_content"]["body"] == final.text


async def test_a_cast_members_stream_carries_its_profile_and_fallback() -> None:
    """MSC4144: the profile and the name fallback in the first message and in every edit's
    `m.new_content`; two cast members answering one event get different transaction ids."""
    clock = _Clock()
    sent: list[tuple[dict[str, Any], str]] = []

    async def send(content: dict[str, Any], txn: str, *, droppable: bool = False) -> str:
        sent.append((content, txn))
        return "$reply"

    face = Face("sage", "Sage <3", "mxc://hs/abc")
    target = ReplyTarget("$asked", None, "m.text", True, face=face)
    reply = StreamedReply(target, send, Pacer(1.0, clock))
    items: list[tuple[float, Event]] = [(0.0, Delta("Hel")), (2.0, Delta("lo"))]
    items.append((2.1, Done("Hello", _persona(), "test")))
    await reply.render(_events(clock, items))
    (first, first_txn), *edits = sent
    assert first["body"] == "Sage <3: Hel"
    assert first["formatted_body"].startswith(
        '<p><strong data-mx-profile-fallback="">Sage &lt;3: </strong>Hel'
    )
    expected = {"id": "sage", "displayname": "Sage <3", "avatar_url": "mxc://hs/abc"}
    assert first[PROFILE] == {**expected, "has_fallback": True}
    assert edits, "the stream was edited"
    final = edits[-1][0]
    assert final["m.new_content"]["body"] == "Sage <3: Hello"
    assert final["m.new_content"][PROFILE]["id"] == "sage"
    assert final["body"] == "* Sage <3: Hello" and PROFILE not in final
    alone = ReplyTarget("$asked", None, "m.text", True)
    other = ReplyTarget("$asked", None, "m.text", True, face=Face("mimi", "Mimi"))
    assert len({first_txn, alone.txn("first"), other.txn("first")}) == 3
    assert profile_id(final) == "sage" and profile_id({"body": "x"}) is None
