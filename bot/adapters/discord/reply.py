"""One streamed Discord reply: typing while the model thinks, then messages edited as text grows.

Edits happen at most once per `interval` seconds plus a final edit; text past 2,000 characters
flows into further messages (see `split_message`). Everything is sent with
`AllowedMentions.none()`, so no reply can ping anyone, whatever the model or a user wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import discord

from bot.adapters.discord.render import Throttle, split_message

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
UNPOSTED = "I drew a picture but couldn't post it here (I may not be allowed to attach files)."
_TYPING_RENEW = 8.0  # Discord shows "typing" for about 10 seconds per trigger


class ReplyView:
    def __init__(
        self,
        source: discord.Message,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.text = ""
        self.sent: list[discord.Message] = []
        self._shown: list[str] = []
        self._throttle = Throttle(interval, clock)
        self._typing: asyncio.Task[None] | None = None
        self.files: list[discord.Message] = []  # pictures posted after the reply

    async def start_typing(self) -> None:
        """Show "… is typing" (renewed every few seconds) until the first message goes out."""
        self._typing = asyncio.create_task(self._keep_typing())

    async def _keep_typing(self) -> None:
        while True:
            try:
                await self.source.channel.typing()
            except discord.HTTPException:
                log.warning("could not show the typing indicator in %s", self.source.channel.id)
                return
            await asyncio.sleep(_TYPING_RENEW)

    async def stop_typing(self) -> None:
        typing, self._typing = self._typing, None
        if typing is not None:
            typing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await typing

    async def grow(self, delta: str) -> None:
        self.text += delta
        if self._throttle.ready():
            await self.show(self.text)

    async def finish(self, text: str) -> None:
        """The final edit: the whole reply, exactly as the engine settled it."""
        self.text = text
        await self.show(text)

    async def notice(self, sentence: str) -> None:
        """A note for the user before the reply starts (e.g. "waking up…"); the reply's first
        edit replaces it. Ignored once reply text is showing."""
        if not self.text.strip():
            await self.show(f"*{sentence}*")

    async def fail(self, sentence: str, *, retract: bool = False) -> None:
        """Say what went wrong: after the partial reply if there is one, else on its own.
        With `retract` the partial reply is taken back (edited away), not kept."""
        if self.sent and self.text.strip() and not retract:
            await self.show(f"{self.text.rstrip()}\n\n*{sentence}*")
        else:
            self.text = ""
            await self.show(sentence)

    async def show(self, text: str) -> None:
        chunks = split_message(text)
        if not chunks:
            return
        await self.stop_typing()
        for index, chunk in enumerate(chunks):
            if index < len(self.sent):
                if self._shown[index] != chunk:
                    await self.sent[index].edit(content=chunk, allowed_mentions=NO_MENTIONS)
                    self._shown[index] = chunk
                continue
            self.sent.append(await self._send(chunk, first=index == 0))
            self._shown.append(chunk)
        for extra in self.sent[len(chunks) :]:
            with contextlib.suppress(discord.HTTPException):
                await extra.delete()
        del self.sent[len(chunks) :]
        del self._shown[len(chunks) :]

    async def attach(self, path: Path, *, spoiler: bool, caption: str) -> None:
        """A picture the model drew, posted as a file after the reply (spoilered if flagged)."""
        await self.stop_typing()
        picture = discord.File(path, spoiler=spoiler, description=caption[:1024])
        try:
            if self.sent:
                message = await self.source.channel.send(file=picture, allowed_mentions=NO_MENTIONS)
            else:
                message = await self.source.reply(
                    file=picture, mention_author=False, allowed_mentions=NO_MENTIONS
                )
        except discord.HTTPException as exc:
            log.warning("could not post a picture in %s: %s", self.source.channel.id, exc.status)
            with contextlib.suppress(discord.HTTPException):
                await self.source.channel.send(UNPOSTED, allowed_mentions=NO_MENTIONS)
            return
        finally:
            picture.close()
        self.files.append(message)

    async def _send(self, chunk: str, *, first: bool) -> discord.Message:
        if first:
            return await self.source.reply(
                chunk, mention_author=False, allowed_mentions=NO_MENTIONS
            )
        return await self.source.channel.send(chunk, allowed_mentions=NO_MENTIONS)


async def send_plain(source: discord.Message, text: str) -> list[discord.Message]:
    """A one-off reply (a notice), split and with no mentions."""
    view = ReplyView(source, interval=0)
    await view.show(text)
    return view.sent
