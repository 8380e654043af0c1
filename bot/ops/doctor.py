"""`python -m bot doctor`: is this installation ready to run? A table of what is fine and what is
wrong, with the fix for each problem; exit code 1 when anything is wrong.

Checks: the settings themselves, persona and prompt files, migrations, the database and its
pgvector version, each model backend and whether the models the personas (and memory, and the
guard) need are pulled there, the local fallback model, and the Discord, Matrix and Fal
credentials. Credentials get format checks offline; `--online` also asks Discord and the
Matrix homeserver. Secrets are never printed.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import asyncpg
from pydantic import ValidationError

from bot import db
from bot.config import Settings
from bot.errors import BotError
from bot.ops.credentials import DISCORD_API, check_discord, check_fal, check_matrix
from bot.ops.diagnostics import Check, render
from bot.ops.doctor_backends import check_backends
from bot.ops.doctor_casts import check_discord_casts

log = logging.getLogger(__name__)

PGVECTOR_MIN = (0, 7, 0)  # halfvec, used by memories
DB_TIMEOUT = 10.0


def settings_problems(exc: ValidationError) -> list[Check]:
    checks = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "settings"
        checks.append(
            Check(
                "FAIL",
                f"setting {field.upper()}",
                str(error["msg"]),
                f"correct {field.upper()} in the environment or .env (see the README table)",
            )
        )
    return checks


def check_files(settings: Settings) -> list[Check]:
    from bot.core.persona_files import check_directory

    checks: list[Check] = []
    personas, problems = check_directory(settings.personas_dir)
    for problem in problems:
        checks.append(
            Check("FAIL", "persona file", str(problem), "fix the file; then run `personas check`")
        )
    if personas:
        names = ", ".join(p.name for p in personas)
        checks.append(
            Check("ok", "personas", f"{len(personas)} valid in {settings.personas_dir}: {names}")
        )
    elif not problems:
        checks.append(
            Check(
                "FAIL",
                "personas",
                f"no persona files in {settings.personas_dir}",
                "set PERSONAS_DIR to a directory of persona YAML files",
            )
        )
    missing = sorted(
        {
            p.prompt_template
            for p in personas
            if not (settings.prompts_dir / p.prompt_template).is_file()
        }
    )
    if missing:
        checks.append(
            Check(
                "FAIL",
                "prompts",
                f"missing in {settings.prompts_dir}: {', '.join(missing)}",
                "set PROMPTS_DIR to the prompts/ directory of the checkout or image",
            )
        )
    elif personas:
        checks.append(Check("ok", "prompts", f"templates found in {settings.prompts_dir}"))
    return checks


def check_platforms(settings: Settings) -> list[Check]:
    if settings.discord_token or settings.matrix_homeserver:
        return []
    return [
        Check(
            "FAIL",
            "chat platform",
            "none configured: `python -m bot run` has nothing to connect to",
            "set DISCORD_TOKEN, or MATRIX_HOMESERVER with MATRIX_USER_ID and a password or "
            "access token (the terminal chat, `python -m bot chat`, needs neither)",
        )
    ]


def _where(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    where = parts.hostname or "a local socket"
    if parts.port:
        where += f":{parts.port}"
    return where + (parts.path or "")


async def check_database(settings: Settings) -> list[Check]:
    try:
        url = await asyncio.to_thread(db.database_url, settings)
    except BotError as exc:
        return [
            Check("FAIL", "database", str(exc), "check DATA_DIR is writable, or set DATABASE_URL")
        ]
    where = "embedded" if settings.database_url is None else _where(url)
    try:
        conn = await asyncpg.connect(url, timeout=DB_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return [
            Check(
                "FAIL",
                "database",
                f"cannot connect to {where} ({type(exc).__name__})",
                "check DATABASE_URL (host, port, user, password, database) and that the "
                "server is running and reachable from here",
            )
        ]
    try:
        return await _database_details(conn, settings, where)
    finally:
        await conn.close()


async def _database_details(
    conn: asyncpg.Connection, settings: Settings, where: str
) -> list[Check]:
    version = await conn.fetchval("SHOW server_version")
    checks = [Check("ok", "database", f"PostgreSQL {version} at {where}")]
    installed = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    available = await conn.fetchval(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
    )
    minimum = ".".join(map(str, PGVECTOR_MIN))
    found = installed or available
    if found is None:
        checks.append(
            Check(
                "FAIL",
                "pgvector",
                "the vector extension is not available on this server",
                f"install pgvector {minimum} or later on the server (or unset DATABASE_URL "
                "to use the embedded PostgreSQL, which has it)",
            )
        )
    elif _version(found) < PGVECTOR_MIN:
        checks.append(
            Check(
                "FAIL",
                "pgvector",
                f"version {found} is too old (halfvec needs {minimum})",
                "upgrade pgvector on the server, then `ALTER EXTENSION vector UPDATE`",
            )
        )
    else:
        state = "installed" if installed else "available (migrations create it)"
        checks.append(Check("ok", "pgvector", f"{found} {state}"))
    checks.append(await _migrations(conn, settings))
    return checks


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


async def _migrations(conn: asyncpg.Connection, settings: Settings) -> Check:
    try:
        known = {m.name for m in db.discover_migrations(settings.migrations_dir)}
    except BotError as exc:
        return Check(
            "FAIL", "migrations", str(exc), "set MIGRATIONS_DIR to the migrations/ directory"
        )
    if not known:
        return Check(
            "FAIL",
            "migrations",
            f"none found in {settings.migrations_dir}",
            "set MIGRATIONS_DIR to the migrations/ directory of the checkout or image",
        )
    has_table = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = (
        {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        if has_table
        else set()
    )
    unknown = sorted(applied - known)
    if unknown:
        return Check(
            "FAIL",
            "migrations",
            f"the database has newer migrations: {', '.join(unknown)}",
            "run the newer version of the bot that migrated this database",
        )
    pending = sorted(known - applied)
    if pending:
        return Check(
            "warn",
            "migrations",
            f"{len(pending)} pending: {', '.join(pending)}",
            "`python -m bot migrate` (they are also applied at every start)",
        )
    return Check("ok", "migrations", f"all {len(known)} applied")


async def diagnose(
    settings: Settings, *, online: bool = False, discord_api: str = DISCORD_API
) -> list[Check]:
    checks = check_files(settings) + check_platforms(settings)
    checks += await check_database(settings)
    checks += await check_backends(settings)
    checks += await check_discord(settings, online=online, api=discord_api)
    checks += await check_discord_casts(settings, online=online)
    checks += await check_matrix(settings, online=online)
    checks += check_fal(settings)
    return checks


def run_doctor(*, online: bool = False) -> int:
    """The command: print the table on stdout; 0 when nothing is wrong, 1 otherwise."""
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.stdout.write(render(settings_problems(exc)))
        return 1
    from bot.ops.logs import setup_logging

    setup_logging(settings.model_copy(update={"log_file": False}), stderr_level="ERROR")
    checks = asyncio.run(diagnose(settings, online=online))
    sys.stdout.write(render(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0
