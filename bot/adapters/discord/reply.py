"""One streamed Discord reply: typing while the model thinks, then messages edited as text grows.

The model's stream never waits for Discord: `grow` only records the text, and a background
editor per reply sends the latest text at most once per `interval` seconds, within the channel's
shared budget (budget.py). A 429 (discord.py raises `RateLimited` past the client's
`max_ratelimit_timeout`) makes the editor wait `retry_after` and double its interval. The final
text always goes out in one last edit.

Discord's errors during a reply: our message was deleted (10008) → it is sent again; the bot may
not post (403: 50001, 50013) → logged once per channel and the author told by DM once; the
user's message was deleted → every chunk is a reply with `fail_if_not_exists=False`, so it is
posted anyway. Follow-on chunks are replies too, so they stay attached to the question.
Everything is sent with `AllowedMentions.none()`: no reply can ping anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import discord

from bot.adapters.discord.budget import ChannelBudget
from bot.adapters.discord.render import split_message

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
UNPOSTED = "I drew a picture but couldn't post it here (I may not be allowed to attach files)."
DENIED = (
    "I couldn't answer you in #{channel}: I'm not allowed to post there. "
    "An admin can give me the Send Messages permission in that channel."
)
_TYPING_RENEW = 8.0  # Discord shows "typing" for about 10 seconds per trigger
_MAX_INTERVAL = 10.0
_FINAL_TRIES = 3


class ReplyView:
    def __init__(
        self,
        source: discord.Message,
        interval: float,
        budget: ChannelBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.interval = interval
        self.budget = budget if budget is not None else ChannelBudget(clock=clock)
        self.text = ""
        self.sent: list[discord.Message] = []
        self.files: list[discord.Message] = []  # pictures posted after the reply
        self._shown: list[str] = []
        self._clock = clock
        self._last_show: float | None = None
        self._denied = False
        self._closed = False
        self._typing: asyncio.Task[None] | None = None
        self._editor: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()

    @property
    def _channel_id(self) -> int:
        return int(self.source.channel.id)

    # --- typing ---------------------------------------------------------------------------

    async def start_typing(self) -> None:
        """Show "… is typing" (renewed every few seconds) until the first message goes out."""
        self._typing = asyncio.create_task(self._keep_typing())

    async def _keep_typing(self) -> None:
        while True:
            try:
                await self.source.channel.typing()
            except discord.HTTPException:
                log.warning("could not show the typing indicator in %s", self._channel_id)
                return
            await asyncio.sleep(_TYPING_RENEW)

    async def stop_typing(self) -> None:
        typing, self._typing = self._typing, None
        if typing is not None:
            typing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await typing

    # --- the background editor -------------------------------------------------------------

    async def grow(self, delta: str) -> None:
        """More reply text. The first words are sent at once; after that this returns at once
        and the editor shows the text when Discord allows."""
        self.text += delta
        if not self.sent and not self._closed:
            await self._show_now(self.text)  # the first words go out at once
            return
        self._dirty.set()
        if self._editor is None and not self._closed:
            self._editor = asyncio.create_task(self._edit_loop())

    async def _edit_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await self._pause(self._wait())
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                await self._show_now(self.text)
            except discord.RateLimited as exc:
                self._slow_down(exc.retry_after)
            except discord.HTTPException as exc:
                if exc.status == 429:
                    self._slow_down(self.interval)
                else:  # the final edit tries again and reports what it must
                    log.warning("an edit in %s failed: %s", self._channel_id, exc.status)

    def _wait(self) -> float:
        since = 0.0 if self._last_show is None else self._clock() - self._last_show
        return max(self.interval - since, self.budget.delay(self._channel_id), 0.0)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the reply is finishing."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)

    def _slow_down(self, retry_after: float) -> None:
        self.interval = min(self.interval * 2, _MAX_INTERVAL)
        self.budget.back_off(self._channel_id, retry_after)
        self._dirty.set()
        log.info(
            "Discord rate-limited edits in %s; every %.1fs now", self._channel_id, self.interval
        )

    async def _stop_editor(self, *, cancel: bool = False) -> None:
        """End the editor; a request in flight lands first (unless cancelling). Text that
        grows afterwards (after a notice, say) starts a new one."""
        editor, self._editor = self._editor, None
        if editor is not None:
            self._stop.set()
            self._dirty.set()
            if cancel:
                editor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await editor
        self._stop.clear()
        self._dirty.clear()

    async def close(self) -> None:
        """The reply is over (or abandoned): no more edits, no typing."""
        self._closed = True
        await self._stop_editor(cancel=True)
        await self.stop_typing()

    # --- what the engine's events become -------------------------------------------------

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
        """Show `text` next: after the editor's request in flight, an interval after the last
        edit and within the channel's budget."""
        await self._stop_editor()
        for attempt in range(_FINAL_TRIES):
            await asyncio.sleep(self._wait())
            try:
                await self._show_now(text)
                return
            except discord.RateLimited as exc:
                if attempt == _FINAL_TRIES - 1:
                    raise
                self.budget.back_off(self._channel_id, exc.retry_after)

    async def _show_now(self, text: str) -> None:
        chunks = split_message(text)
        if not chunks or self._denied:
            return
        await self.stop_typing()
        try:
            for index, chunk in enumerate(chunks):
                if index < len(self.sent):
                    if self._shown[index] != chunk:
                        await self._edit(index, chunk)
                    continue
                self.sent.append(await self._send(chunk))
                self._shown.append(chunk)
            for extra in self.sent[len(chunks) :]:
                with contextlib.suppress(discord.HTTPException):
                    await extra.delete()
        except discord.Forbidden as exc:
            await self._denied_here(exc)
            return
        finally:
            self._last_show = self._clock()
        del self.sent[len(chunks) :]
        del self._shown[len(chunks) :]

    async def _edit(self, index: int, chunk: str) -> None:
        self.budget.spend(self._channel_id)
        try:
            await self.sent[index].edit(content=chunk, allowed_mentions=NO_MENTIONS)
        except discord.NotFound:  # someone deleted our message: post this part again
            log.info("a reply message in %s was deleted; sending it again", self._channel_id)
            self.sent[index] = await self._send(chunk)
        self._shown[index] = chunk

    async def _send(self, chunk: str) -> discord.Message:
        """Each chunk replies to the user's message, which may have been deleted meanwhile."""
        self.budget.spend(self._channel_id)
        return await self.source.channel.send(
            chunk,
            reference=self.source.to_reference(fail_if_not_exists=False),
            mention_author=False,
            allowed_mentions=NO_MENTIONS,
        )

    async def _denied_here(self, error: discord.Forbidden) -> None:
        """The bot may not post here: say so once in the log, and to this author once by DM."""
        self._denied = True
        channel = self.source.channel
        if self.budget.first_denial(self._channel_id):
            log.warning(
                "not allowed to post in Discord channel %s (code %s): give the bot Send Messages",
                self._channel_id,
                error.code,
            )
        author = self.source.author
        if not self.budget.first_telling(self._channel_id, author.id):
            return
        name = getattr(channel, "name", None) or "that channel"
        with contextlib.suppress(discord.HTTPException):
            await author.send(DENIED.format(channel=name), allowed_mentions=NO_MENTIONS)

    async def attach(self, path: Path, *, spoiler: bool, caption: str) -> None:
        """A picture the model drew, posted as a file after the reply (spoilered if flagged)."""
        await self._stop_editor()
        await self.stop_typing()
        picture = discord.File(path, spoiler=spoiler, description=caption[:1024])
        try:
            message = await self.source.channel.send(
                file=picture,
                reference=self.source.to_reference(fail_if_not_exists=False),
                mention_author=False,
                allowed_mentions=NO_MENTIONS,
            )
        except discord.HTTPException as exc:
            log.warning("could not post a picture in %s: %s", self._channel_id, exc.status)
            with contextlib.suppress(discord.HTTPException):
                await self.source.channel.send(UNPOSTED, allowed_mentions=NO_MENTIONS)
            return
        finally:
            picture.close()
        self.files.append(message)


async def send_plain(
    source: discord.Message, text: str, budget: ChannelBudget | None = None
) -> list[discord.Message]:
    """A one-off reply (a notice), split and with no mentions."""
    view = ReplyView(source, interval=0, budget=budget)
    await view.show(text)
    return view.sent
