"""A cast of personas on Discord: the glue between the adapter and bot/core/cast.py.

Describes a Discord message as a `Said` (who it replies to: a persona's message is known by its
id in the `Stage`, by the webhook's name, or by the bold name the bot's account puts first),
and renders a cast member's reply under its own name: through the channel's webhook when the
bot may manage webhooks (webhooks.py), else from the bot's account with the name in bold.
A cast of one speaks exactly as before: from the bot's account, no name.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence

import discord

from bot.adapters.discord.budget import ChannelBudget
from bot.adapters.discord.conversations import replied_to
from bot.adapters.discord.render import trigger_text
from bot.adapters.discord.reply import ReplyView
from bot.adapters.discord.webhooks import WebhookReplyView, Webhooks
from bot.core.attention import Attention
from bot.core.cast import Casting, Choice, Cue, Said, Stage, play
from bot.core.events import Incoming
from bot.core.personas import Persona

_BOLD_NAME = re.compile(r"\*\*(?P<name>[^*\n]{1,80})\*\*")


class NamedReplyView(ReplyView):
    """A reply from the bot's account with the persona's name in bold before it."""

    def __init__(
        self, source: discord.Message, interval: float, name: str, budget: ChannelBudget
    ) -> None:
        super().__init__(source, interval, budget)
        self.name = name

    async def _show_now(self, text: str) -> None:
        await super()._show_now(f"**{self.name}**: {text}" if text else text)


def persona_by_display(cast: Sequence[Persona], name: str) -> Persona | None:
    wanted = name.strip().lower()
    for persona in cast:
        if wanted in (persona.display_name.lower(), persona.name.lower()):
            return persona
    return None


def replied_persona(
    message: discord.Message, cast: Sequence[Persona], stage: Stage, *, reply_to_bot: bool
) -> str | None:
    """The cast member whose message `message` replies to, when it is one."""
    reference = replied_to(message)  # a forward is not a reply
    if reference is None or reference.message_id is None:
        return None
    known = stage.author(str(reference.message_id))
    if known is not None:
        return known[0]
    resolved = reference.resolved
    if isinstance(resolved, discord.Message):
        if resolved.webhook_id is not None:  # a persona's face: the webhook message's name
            found = persona_by_display(cast, resolved.author.name)
            if found is not None:
                return found.name
        bold = _BOLD_NAME.match(resolved.content)
        if reply_to_bot and bold is not None:
            found = persona_by_display(cast, bold.group("name"))
            if found is not None:
                return found.name
    if reply_to_bot and len(cast) == 1:
        return cast[0].name
    return None


def said_of(
    message: discord.Message,
    cast: Sequence[Persona],
    stage: Stage,
    *,
    reply_to_bot: bool,
    mentioned: bool,
    always_listen: bool,
) -> Said:
    """A person's Discord message as the cast sees it."""
    replied = replied_persona(message, cast, stage, reply_to_bot=reply_to_bot)
    return Said(
        text=trigger_text(message.content),  # names in what a person reads
        reply_to=replied,
        # a reply to the bot whose persona is unknown still speaks to the cast
        mentioned=mentioned or (reply_to_bot and replied is None),
        is_dm=message.guild is None,
        always_listen=always_listen,
        from_bot=message.author.bot,
    )


class Faces:
    """How a cast member's reply looks: a cast of one as before (the bot's account, no name);
    in a larger cast, through the channel's webhook under the persona's name and face, or from
    the bot's account with the name in bold where the bot may not manage webhooks."""

    def __init__(
        self, interval: float, budget: ChannelBudget, webhooks: Webhooks | None = None
    ) -> None:
        self.interval = interval
        self.budget = budget  # the channel's sends and edits, shared with every reply there
        self.webhooks = webhooks or Webhooks()

    def ours(self, message: discord.Message) -> bool:
        """A message one of our webhooks posted (it comes back through the gateway)."""
        return message.webhook_id is not None and message.webhook_id in self.webhooks.ids

    async def view(
        self, source: discord.Message, persona: Persona, named: bool, cast: Sequence[Persona] = ()
    ) -> ReplyView:
        if not named:
            return ReplyView(source, self.interval, self.budget)
        hook = await self.webhooks.hook(source.channel, persona, cast)
        if hook is None:
            return NamedReplyView(source, self.interval, persona.display_name, self.budget)
        return WebhookReplyView(
            source, self.interval, self.budget, hook=hook, persona=persona, hooks=self.webhooks
        )


Reply = Callable[[discord.Message, Incoming, ReplyView], Awaitable[str | None]]


class CastPlayer(Casting):
    """Plays a cast's turns in one channel: each chosen persona answers a message once, then
    the others may answer that reply, within the persona-turn budget (bot/core/cast.py)."""

    def __init__(
        self, faces: Faces, attention: Attention, *, answer_dms: bool, answer_bots: bool
    ) -> None:
        super().__init__(attention, answer_dms=answer_dms, answer_bots=answer_bots)
        self.faces = faces

    async def play(
        self,
        message: discord.Message,
        incoming: Incoming,
        cast: list[Persona],
        choices: list[Choice],
        reply: Reply,
    ) -> None:
        """`reply` renders the engine's answer into the view and returns its text; the turns
        are the core's (bot/core/cast.py `play`), each reply answering the message before it."""
        messages = {str(message.id): message}  # the Discord message behind each id in play

        async def one(cue: Cue) -> tuple[str, str] | None:
            source = messages[cue.message_id]
            view = await self.faces.view(source, cue.persona, len(cast) > 1, cast)
            text = await reply(source, cue.incoming, view)
            if text is None or not view.sent:
                return None
            said = view.sent[0]
            messages[str(said.id)] = said
            return str(said.id), text

        def speaks(said: Said) -> list[Choice]:
            return self.who_speaks(cast, said, incoming.conversation)

        await play(self.stage, speaks, incoming, str(message.id), choices, answer=one)
