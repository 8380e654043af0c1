"""A cast of personas in one conversation: who speaks, and how each sees the shared history.

Platform-neutral; adapters describe a message as a `Said` and post one reply per `Choice`.

- A conversation's cast is stored beside its single persona (`History.cast`); no rows means the
  conversation's persona alone: a cast of one, answered exactly as before (attention.py).
- In a larger cast a persona answers when it is named (name, display name or alias) or replied
  to. A message that names nobody (an @mention of the bot included) is answered by at most one
  persona: the most attentive one (`Attention.probability`), with that probability, or surely
  when the bot was mentioned or the channel always listens.
- Personas answer each other too, within a budget: a persona's reply carries the number of
  persona replies since the last person's message (`Said.turn`: 1 for the first, and so on, all
  branches counted together); a persona answers it only while that number is below its
  `max_persona_turns`, never answers itself, and never answers one message twice
  (`Stage.claim`).
- Each persona sees the others' replies as named user lines (`view_for`), its own as its own.
- `play` runs the turns for adapters that give an answer as one call (Matrix, the terminal).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bot.core.attention import Attention, Trigger, mentions_name
from bot.core.events import Incoming
from bot.core.history import Conversation, History
from bot.core.personas import Persona
from bot.core.prompts import Turn

_STAGE_MEMORY = 4096  # messages remembered per process (who wrote them, who answered them)


@dataclass(frozen=True)
class Said:
    """One message as the cast sees it."""

    text: str
    author: str | None = None  # the cast member (persona name) who wrote it; None: a person
    reply_to: str | None = None  # the persona whose message this replies to
    mentioned: bool = False  # the bot itself was @mentioned
    is_dm: bool = False
    always_listen: bool = False
    from_bot: bool = False  # another bot (not one of our personas)
    turn: int = 0  # persona replies since the last person's message; a person's message is 0


@dataclass(frozen=True)
class Choice:
    persona: Persona
    reason: str


async def cast_for(
    history: History, resolve: Callable[[str | None], Persona], conversation: Conversation
) -> list[Persona]:
    """The conversation's cast; personas no longer loaded are left out; never empty."""
    names = await history.cast(conversation.id)
    members: dict[str, Persona] = {}
    for name in names:
        persona = resolve(name)
        if persona.name == name:  # resolve() falls back to the default for unknown names
            members.setdefault(name, persona)
    return list(members.values()) or [resolve(conversation.persona)]


def who_speaks(
    cast: Sequence[Persona],
    said: Said,
    attention: Attention,
    conversation_key: str,
    *,
    answer_dms: bool = True,
    answer_bots: bool = False,
) -> list[Choice]:
    """The personas that answer `said`, in cast order (at most one when nobody is named)."""
    if said.author is None and len(cast) == 1:
        return _alone(
            cast[0],
            said,
            attention,
            conversation_key,
            answer_dms=answer_dms,
            answer_bots=answer_bots,
        )
    if (said.from_bot and not answer_bots) or (said.is_dm and not answer_dms):
        return []
    candidates = [p for p in cast if p.name != said.author]
    if said.author is not None:
        candidates = [p for p in candidates if said.turn < p.max_persona_turns]
    named = [p for p in candidates if p.name == said.reply_to or mentions_name(p, said.text)]
    if named:
        for persona in named:
            attention.addressed(conversation_key, persona)
        return [Choice(p, _named_reason(p, said)) for p in named]
    if not candidates:
        return []
    chosen = max(candidates, key=lambda p: attention.probability(conversation_key, p))
    if said.author is None and (said.mentioned or said.always_listen or said.is_dm):
        attention.addressed(conversation_key, chosen)
        return [Choice(chosen, "spoken to the cast; the most attentive answers")]
    decision = attention.decide(
        conversation_key=conversation_key, persona=chosen, text="", trigger=Trigger()
    )
    return [Choice(chosen, decision.reason)] if decision.answer else []


def _alone(
    persona: Persona,
    said: Said,
    attention: Attention,
    conversation_key: str,
    *,
    answer_dms: bool,
    answer_bots: bool,
) -> list[Choice]:
    """A cast of one: today's triggers and attention, unchanged."""
    trigger = Trigger(
        mentioned=said.mentioned,
        reply_to_bot=said.reply_to == persona.name,
        is_dm=said.is_dm,
        always_listen=said.always_listen,
        from_bot=said.from_bot,
    )
    decision = attention.decide(
        conversation_key=conversation_key,
        persona=persona,
        text=said.text,
        trigger=trigger,
        answer_dms=answer_dms,
        answer_bots=answer_bots,
    )
    return [Choice(persona, decision.reason)] if decision.answer else []


def _named_reason(persona: Persona, said: Said) -> str:
    who = "a persona" if said.author is not None else "someone"
    if persona.name == said.reply_to:
        return f"{who} replied to it"
    return f"{who} named it"


def view_for(
    persona: Persona,
    turns: Sequence[Turn],
    display: Callable[[str], str],
    *,
    heard_from: str | None = None,
    repeat_of: str | None = None,
) -> list[Turn]:
    """History as `persona` sees it: its own replies stay its own; other personas' replies
    become user lines under their display names. The message being answered comes last as the
    new message, so its stored copy is dropped: `heard_from`, another persona's latest reply
    (the last row); `repeat_of`, a person's message another cast member answered first."""
    view = list(turns)
    if heard_from is not None and view:
        last = view[-1]
        if last.role == "assistant" and last.author_name == heard_from:
            view.pop()
    if repeat_of is not None:
        for index in range(len(view) - 1, -1, -1):
            if view[index].role == "user" and view[index].content == repeat_of:
                del view[index]
                break
    return [
        Turn("user", display(t.author_name), t.content)
        if t.role == "assistant" and t.author_name != persona.name
        else t
        for t in view
    ]


class Stage:
    """Which persona wrote which message (and at which turn), and which persona already
    answered which message. In-process and bounded, like attention's last-addressed times."""

    def __init__(self, limit: int = _STAGE_MEMORY) -> None:
        self._limit = limit
        self._wrote: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._answered: OrderedDict[tuple[str, str], None] = OrderedDict()

    def wrote(self, message_id: str, persona: str, turn: int) -> None:
        self._wrote[message_id] = (persona, turn)
        self._trim(self._wrote)

    def author(self, message_id: str) -> tuple[str, int] | None:
        """(persona, turn) of a message a persona wrote, None when unknown."""
        return self._wrote.get(message_id)

    def claim(self, message_id: str, persona: str) -> bool:
        """True the first time `persona` is to answer `message_id`, False ever after."""
        key = (message_id, persona)
        if key in self._answered:
            return False
        self._answered[key] = None
        self._trim(self._answered)
        return True

    def _trim(self, table: OrderedDict[Any, Any]) -> None:
        while len(table) > self._limit:
            table.popitem(last=False)


class Casting:
    """A platform's rules for who speaks (attention; whether DMs and bots are answered) and its
    `Stage`: what the adapters' cast players share."""

    def __init__(self, attention: Attention, *, answer_dms: bool, answer_bots: bool) -> None:
        self.attention = attention
        self.stage = Stage()  # who wrote which message, who answered what
        self._answer_dms = answer_dms
        self._answer_bots = answer_bots

    def who_speaks(self, cast: Sequence[Persona], said: Said, key: str) -> list[Choice]:
        return who_speaks(
            cast,
            said,
            self.attention,
            key,
            answer_dms=self._answer_dms,
            answer_bots=self._answer_bots,
        )


@dataclass(frozen=True)
class Cue:
    """One cast member to answer one message: `incoming` names the persona (and, for another
    persona's message, `from_persona`); `message_id` is the message answered."""

    persona: Persona
    incoming: Incoming
    message_id: str


# Gives one answer; returns (the sent message's id, its text), or None when nothing was said.
Answer = Callable[[Cue], Awaitable[tuple[str, str] | None]]


async def play(
    stage: Stage,
    speaks: Callable[[Said], list[Choice]],
    incoming: Incoming,
    message_id: str,
    choices: list[Choice],
    *,
    answer: Answer,
) -> None:
    """Each chosen persona answers `message_id` once, then the others may answer its reply,
    within the persona-turn budget (`speaks` is `who_speaks` for this conversation)."""
    await _play(stage, speaks, incoming, message_id, choices, answer=answer, spent=_Spent())


async def _play(
    stage: Stage,
    speaks: Callable[[Said], list[Choice]],
    incoming: Incoming,
    message_id: str,
    choices: list[Choice],
    *,
    answer: Answer,
    spent: _Spent,
) -> None:
    for choice in choices:
        persona = choice.persona
        if incoming.from_persona is not None and spent.turns >= persona.max_persona_turns:
            continue  # siblings used up the budget meanwhile
        if not stage.claim(message_id, persona.name):
            continue
        said = await answer(Cue(persona, replace(incoming, persona=persona.name), message_id))
        if said is None:
            continue
        incoming = replace(incoming, repeat=True)  # stored now, with this first answer
        sent, text = said
        spent.turns += 1
        stage.wrote(sent, persona.name, spent.turns)
        after = speaks(Said(text, author=persona.name, turn=spent.turns))
        if after:
            spoken = replace(
                incoming,
                author_id=f"persona:{persona.name}",
                author_name=persona.display_name,
                text=text,
                from_persona=persona.name,
                repeat=False,
            )
            await _play(stage, speaks, spoken, sent, after, answer=answer, spent=spent)


@dataclass
class _Spent:
    """Persona replies so far after one person's message: the budget is shared by the chain."""

    turns: int = 0
