"""The terminal chat: `python -m bot chat`.

The reply goes to stdout as it streams; everything else (which model answered, notices,
errors) goes to stderr, so `chat -m TEXT` can be scripted. Lines starting with "/" are commands.
A cast (`/persona cast add NAME`) plays here too (bot/core/cast.py): each persona that speaks
prints its reply on a line of its own, under its name (`Sage: …`), also with `-m`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from bot.core.attention import Attention
from bot.core.cast import Casting, Choice, Cue, Said, play
from bot.core.commands import CommandContext, Commands, parse
from bot.core.engine import Delta, Done, Engine, Failed, Incoming, Notice, Picture
from bot.errors import BotError, user_message

PLATFORM = "console"


class ConsoleChat:
    def __init__(
        self,
        engine: Engine,
        commands: Commands,
        *,
        user: str,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.engine = engine
        self.commands = commands
        self.user = user
        self.conversation = user
        self.out = out
        self.err = err
        self._last_answered_by: str | None = None
        # who in a cast follows the talk, who wrote which line and answered what
        self.casting = Casting(Attention(), answer_dms=True, answer_bots=False)
        self._said = 0  # lines so far (a cast's stage knows them by number)

    async def choose_persona(self, name: str) -> bool:
        """--persona: switch this conversation before chatting (the operator is admin here)."""
        return await self.command(f"/persona {name}", quiet=True)

    async def send(self, text: str, *, interactive: bool = False) -> bool:
        """One message → its reply on stdout. Returns False when no reply could be given.
        A cast of two or more: each persona that speaks gets a line under its name."""
        incoming = Incoming(PLATFORM, self.conversation, self.user, self.user, text)
        cast = await self.engine.cast_for(PLATFORM, self.conversation)
        if len(cast) == 1:
            name = cast[0].display_name if interactive else None
            return await self._say(incoming, name, interactive=interactive) is not None
        self._said += 1
        message_id = f"console-{self._said}"
        # The terminal talks to the cast as a DM does: the named ones answer, else one surely.
        choices = self.casting.who_speaks(cast, Said(text, is_dm=True), self.conversation)
        answered = False

        async def one(cue: Cue) -> tuple[str, str] | None:
            nonlocal answered
            reply = await self._say(cue.incoming, cue.persona.display_name, interactive=True)
            if reply is None:
                return None
            answered = True
            self._said += 1
            return f"console-{self._said}", reply

        def speaks(said: Said) -> list[Choice]:
            return self.casting.who_speaks(cast, said, self.conversation)

        await play(self.casting.stage, speaks, incoming, message_id, choices, answer=one)
        return answered

    async def _say(self, incoming: Incoming, name: str | None, *, interactive: bool) -> str | None:
        """Render one reply (under `name` when given); its text, or None when none was given."""
        ok = False
        answered: str | None = None
        pending = ""  # whitespace held back so the reply is printed stripped
        async with contextlib.aclosing(self.engine.handle(incoming)) as events:
            async for event in events:
                if isinstance(event, Notice):
                    self._diag(event.text)
                elif isinstance(event, Delta):
                    text = pending + event.text
                    if not ok:
                        text = text.lstrip()
                    body = text.rstrip()
                    pending = text[len(body) :]
                    if not body:
                        continue
                    if not ok and name is not None:
                        self.out.write(f"{name}: ")
                    ok = True
                    self.out.write(body)
                    self.out.flush()
                elif isinstance(event, Done):
                    self.out.write("\n")
                    self.out.flush()
                    self._answered(event.answered_by, always=not interactive)
                    answered = event.text if ok else None
                elif isinstance(event, Failed):
                    if ok:
                        self.out.write("\n")
                    self._diag(event.text)
                    ok, answered = False, None
                elif isinstance(event, Picture):  # drawn by the model, saved in DATA_DIR/images
                    self.out.write(f"{event.path}\n")
                    self.out.flush()
        return answered

    async def command(self, line: str, *, quiet: bool = False) -> bool:
        parsed = parse(line)
        if parsed is None:
            return False
        name, args = parsed
        context = CommandContext(
            PLATFORM,
            self.conversation,
            self.user,
            self.user,
            is_admin=True,
            progress=self._progress,  # /imagine's queue position and progress, on stderr
        )
        try:
            result = await self.commands.run(context, name, args)
        except BotError as exc:
            self._diag(user_message(exc))
            return False
        if not quiet:
            self.out.write(result.text + "\n")
            if result.attachment is not None:  # an /imagine picture, saved in DATA_DIR/images
                self.out.write(f"{result.attachment}\n")
            self.out.flush()
        return True

    async def _progress(self, text: str) -> None:
        self._diag(text)

    async def interactive(self, read_line: Callable[[], str] = input) -> int:
        persona = await self.engine.persona_for(PLATFORM, self.conversation)
        self._diag(
            f"Chatting as {self.user} with {persona.display_name}. "
            "/help lists commands; Ctrl-D quits."
        )
        self.out.write(f"{persona.display_name}: {persona.greeting}\n")
        while True:
            try:
                line = (await asyncio.to_thread(read_line)).strip()
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                return 0
            if not line:
                continue
            if line.startswith("/"):
                await self.command(line)
            else:
                await self.send(line, interactive=True)

    def _answered(self, answered_by: str, *, always: bool) -> None:
        if always or answered_by != self._last_answered_by:
            self._diag(f"answered by {answered_by}")
        self._last_answered_by = answered_by

    def _diag(self, text: str) -> None:
        self.err.write(f"[{text}]\n")
        self.err.flush()
