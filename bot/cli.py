"""Command line: `python -m bot chat|migrate|personas check`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from pathlib import Path

from bot import db
from bot.config import Settings
from bot.errors import BotError
from bot.logs import setup_logging

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a persona in the terminal")
    chat.add_argument("--persona", help="persona to talk to (switches this conversation)")
    chat.add_argument("--user", default=None, help="who you are (default: your login name)")
    chat.add_argument("-m", "--message", help="send one message, print the reply, exit")
    sub.add_parser("run", help="run the configured chat platforms (Discord, Matrix)")
    sub.add_parser("migrate", help="apply pending database migrations")
    personas = sub.add_parser("personas", help="persona files")
    personas_sub = personas.add_subparsers(dest="personas_command", required=True)
    check = personas_sub.add_parser("check", help="validate every persona file")
    check.add_argument("directory", nargs="?", type=Path, help="default: PERSONAS_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    # The terminal chat reports on stderr itself; log lines there would say it all twice.
    setup_logging(settings, stderr_level="ERROR" if args.command == "chat" else "WARNING")
    try:
        if args.command == "chat":
            return asyncio.run(_chat(settings, args))
        if args.command == "run":
            from bot.runner import run

            return asyncio.run(run(settings))
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        return _personas_check(args.directory or settings.personas_dir)
    except BotError as exc:
        log.error("%s", exc)
        sys.stderr.write(f"error: {exc}\n")
        return 2


async def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from bot.adapters.console import ConsoleChat
    from bot.app import running_app

    user = args.user or _login_name()
    async with running_app(settings) as app:
        chat = ConsoleChat(app.engine, app.commands, user=user)
        if args.persona and not await chat.choose_persona(args.persona):
            return 2
        if args.message is not None:
            return 0 if await chat.send(args.message) else 1
        return await chat.interactive()


async def _migrate(settings: Settings) -> int:
    import asyncpg

    url = await asyncio.to_thread(db.database_url, settings)
    conn = await asyncpg.connect(url)
    try:
        applied = await db.migrate(conn, settings.migrations_dir)
    finally:
        await conn.close()
    sys.stdout.write("applied: " + ", ".join(applied) + "\n" if applied else "nothing to apply\n")
    return 0


def _personas_check(directory: Path) -> int:
    from bot.personas import check_directory

    personas, problems = check_directory(directory)
    for persona in personas:
        sys.stdout.write(f"ok  {persona.name}: {persona.display_name} ({persona.model})\n")
    for problem in problems:
        sys.stdout.write(f"bad {problem}\n")
    return 1 if problems or not personas else 0


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "you"
