"""Command line: `python -m bot chat|migrate|personas check`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bot import db
from bot.brains.simtrace import add_simulate_parser
from bot.config import Settings
from bot.errors import BotError
from bot.loop import run as run_loop
from bot.ops.logs import setup_logging
from bot.spend.report import add_spend_parser, spend_cli

if TYPE_CHECKING:
    from bot.core.persona_files import PersonaRegistry

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
    reference = sub.add_parser(
        "config-reference", help="print every setting as a Markdown table (from Settings)"
    )
    reference.add_argument(
        "--write", action="store_true", help="rewrite the table in docs/configuration.md"
    )
    doctor = sub.add_parser("doctor", help="check the configuration, database, models, credentials")
    doctor.add_argument("--online", action="store_true", help="also ask Discord and Matrix")
    sub.add_parser("healthcheck", help="ask the running bot's /healthz; exit 0 when healthy")
    add_spend_parser(sub)  # spend ledger (issue 7)
    add_simulate_parser(sub)  # backend cost simulator (issue 6)
    memories = sub.add_parser("memories", help="long-term memory administration")
    memories_sub = memories.add_subparsers(dest="memories_command", required=True)
    memories_sub.add_parser("reembed", help="move every memory to the current embedding model")
    export = memories_sub.add_parser("export", help="print one user's memories as JSON")
    export.add_argument("--user", required=True, help="user key, e.g. discord:1234")
    export.add_argument(
        "--persona", default=None, help="only what this persona recalls: shared facts and its own"
    )
    personas = sub.add_parser("personas", help="persona files")
    personas_sub = personas.add_subparsers(dest="personas_command", required=True)
    check = personas_sub.add_parser("check", help="validate every persona file")
    check.add_argument("directory", nargs="?", type=Path, help="default: PERSONAS_DIR")
    card = personas_sub.add_parser(
        "import", help="write a persona from a character card (V2/V3, PNG or JSON)"
    )
    card.add_argument("file", type=Path, help="the card: a .png with the card in it, or .json")
    card.add_argument("--dir", type=Path, help="where to write it; default: PERSONAS_DIR")
    card.add_argument("--force", action="store_true", help="replace a persona of the same name")
    return parser


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 (one return per command)
    args = _parser().parse_args(argv)
    if args.command == "doctor":  # before Settings(): broken settings are rows of its table
        from bot.ops.doctor import run_doctor

        return run_doctor(online=args.online)
    if args.command == "config-reference":  # documentation of Settings, not its values
        from bot.ops.config_reference import config_reference_cli

        return config_reference_cli(args.write)
    if args.command == "simulate-cost":  # no settings, database or network: a virtual clock
        if args.goal:
            from bot.brains.simgoal import goal_cli

            logging.getLogger("bot.brains").setLevel(logging.ERROR)  # thousands of wakes
            return goal_cli(args)
        from bot.brains.simulate import simulate_cli

        return simulate_cli(args)
    settings = Settings()
    if args.command == "healthcheck":  # the container's HEALTHCHECK; no logging set-up
        from bot.ops.probe import probe

        return probe(settings)
    # The terminal chat reports on stderr itself; log lines there would say it all twice.
    setup_logging(settings, stderr_level="ERROR" if args.command == "chat" else "WARNING")
    try:
        if args.command == "chat":
            return run_loop(_chat(settings, args))
        if args.command == "run":
            from bot.runner import run

            return run_loop(run(settings))
        if args.command == "memories":
            from bot.memory.admin import run_memories

            user, persona = getattr(args, "user", None), getattr(args, "persona", None)
            return asyncio.run(run_memories(settings, args.memories_command, user, persona))
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "spend":
            from bot.app import own_budgets

            caps = own_budgets(_registry(settings))
            return asyncio.run(spend_cli(settings, args, sys.stdout, persona_caps=caps))
        if args.personas_command == "import":
            return _personas_import(args.file, args.dir or settings.personas_dir, args.force)
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
        if args.message is not None and args.message.startswith("/"):  # e.g. -m "/imagine a fox"
            return 0 if await chat.command(args.message) else 1
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


def _registry(settings: Settings) -> PersonaRegistry:
    """The personas as they are on disk (a broken file is logged and left out)."""
    from bot.core.persona_files import PersonaRegistry

    registry = PersonaRegistry(settings.personas_dir)
    for problem in registry.load_all():
        log.warning("%s", problem)
    return registry


def _personas_check(directory: Path) -> int:
    from bot.core.persona_files import check_directory

    personas, problems = check_directory(directory)
    for persona in personas:
        sys.stdout.write(f"ok  {persona.name}: {persona.display_name} ({persona.model})\n")
    for problem in problems:
        sys.stdout.write(f"bad {problem}\n")
    return 1 if problems or not personas else 0


def _personas_import(source: Path, directory: Path, force: bool) -> int:
    from bot.core.cards import import_card

    imported = import_card(source, directory, force=force)
    for path in imported.written:
        sys.stdout.write(f"wrote {path}\n")
    sys.stdout.write(f"ok  {imported.name}: switch a conversation to it with /persona\n")
    return 0


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "you"
