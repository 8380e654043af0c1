"""Doctor checks for platform credentials: Discord, Matrix, Fal. Never prints a secret.

Offline, each credential gets a format check (the mistakes people make: a `Bot ` prefix, quotes,
a client secret where the bot token belongs). Online (`doctor --online`), Discord and the Matrix
homeserver are asked whether they accept them.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import httpx

from bot.config import Settings
from bot.ops.diagnostics import Check, Status

DISCORD_API = "https://discord.com/api/v10"
ONLINE_TIMEOUT = 10.0
MESSAGE_CONTENT_INTENTS = (1 << 18) | (1 << 19)  # GATEWAY_MESSAGE_CONTENT (or _LIMITED)

_DISCORD_TOKEN = re.compile(r"^([A-Za-z0-9_-]{16,40})\.[A-Za-z0-9_-]{4,10}\.[A-Za-z0-9_-]{20,60}$")
_MATRIX_USER = re.compile(r"^@[a-z0-9._=/+-]+:[A-Za-z0-9.-]+(:\d+)?$")
_FAL_KEY = re.compile(r"^[A-Za-z0-9_-]+:[A-Za-z0-9_-]+$")
_DISCORD_FIX = (
    "copy the token from the Discord Developer Portal (your application → Bot → Reset Token) "
    "into DISCORD_TOKEN, without quotes or a 'Bot ' prefix"
)


def _check(status: Status, name: str, detail: str, fix: str = "") -> Check:
    return Check(status, name, detail, fix)


def discord_token_problem(token: str) -> str | None:
    """Why this cannot be a bot token, or None when its shape is right."""
    if token != token.strip() or token.startswith(("'", '"')):
        return "it has spaces or quotes around it"
    if token.lower().startswith("bot "):
        return "it starts with 'Bot ' (the prefix is added by the bot itself)"
    match = _DISCORD_TOKEN.match(token)
    if match is None:
        return "it is not three dot-separated parts, as bot tokens are"
    head = match.group(1)
    try:
        user_id = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return "its first part does not encode the bot's user id"
    if not user_id.isdigit():
        return "its first part does not encode the bot's user id"
    return None


def discord_bot_id(token: str) -> str:
    head = token.split(".", 1)[0]
    return base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)).decode("ascii")


async def check_discord(settings: Settings, *, online: bool, api: str = DISCORD_API) -> list[Check]:
    if settings.discord_token is None:
        return [_check("off", "discord", "DISCORD_TOKEN is not set")]
    token = settings.discord_token.get_secret_value()
    problem = discord_token_problem(token)
    if problem is not None:
        return [
            _check("FAIL", "discord token", f"DISCORD_TOKEN looks wrong: {problem}", _DISCORD_FIX)
        ]
    if not online:
        return [
            _check(
                "ok",
                "discord token",
                f"well formed (bot user {discord_bot_id(token)}); `doctor --online` asks Discord",
            )
        ]
    return await _discord_online(token, api)


async def _discord_online(token: str, api: str) -> list[Check]:
    headers = {"Authorization": f"Bot {token}", "User-Agent": "personabot-doctor"}
    try:
        async with httpx.AsyncClient(base_url=api, headers=headers, timeout=ONLINE_TIMEOUT) as http:
            me = await http.get("/users/@me")
            app = await http.get("/applications/@me") if me.status_code == 200 else None
    except httpx.HTTPError as exc:
        return [
            _check(
                "warn",
                "discord login",
                f"Discord did not answer ({type(exc).__name__})",
                "check this machine's internet access, then try again",
            )
        ]
    if me.status_code == 401:
        return [
            _check(
                "FAIL", "discord login", "Discord rejected DISCORD_TOKEN (HTTP 401)", _DISCORD_FIX
            )
        ]
    if me.status_code != 200:
        return [
            _check(
                "warn",
                "discord login",
                f"Discord answered HTTP {me.status_code}",
                "try again later; see https://discordstatus.com",
            )
        ]
    user: dict[str, Any] = me.json()
    checks = [
        _check("ok", "discord login", f"logged in as {user.get('username')} ({user.get('id')})")
    ]
    flags = (
        int(app.json().get("flags") or 0) if app is not None and app.status_code == 200 else None
    )
    if flags is not None and not flags & MESSAGE_CONTENT_INTENTS:
        checks.append(
            _check(
                "FAIL",
                "discord intents",
                "the Message Content intent is off",
                "Developer Portal → your application → Bot → turn on MESSAGE CONTENT INTENT",
            )
        )
    elif flags is not None:
        checks.append(_check("ok", "discord intents", "Message Content intent is on"))
    return checks


def _matrix_offline(settings: Settings) -> list[Check]:
    problems: list[tuple[str, str]] = []
    homeserver = settings.matrix_homeserver or ""
    if not homeserver:
        problems.append(
            ("MATRIX_HOMESERVER is not set", "set MATRIX_HOMESERVER to https://your.server")
        )
    elif not re.match(r"^https?://[^/\s]+", homeserver):
        problems.append(
            (
                "MATRIX_HOMESERVER is not an http(s) URL",
                "set MATRIX_HOMESERVER to the client URL, e.g. https://matrix.example.org",
            )
        )
    user = settings.matrix_user_id or ""
    if not _MATRIX_USER.match(user):
        problems.append(
            (
                "MATRIX_USER_ID is missing or not like @bot:example.org",
                "set MATRIX_USER_ID to the bot's full user id, e.g. @mimi:example.org",
            )
        )
    if settings.matrix_password is None and settings.matrix_access_token is None:
        problems.append(
            (
                "neither MATRIX_PASSWORD nor MATRIX_ACCESS_TOKEN is set",
                "set MATRIX_ACCESS_TOKEN (or MATRIX_PASSWORD) for the bot's account",
            )
        )
    return [_check("FAIL", "matrix", detail, fix) for detail, fix in problems]


async def check_matrix(settings: Settings, *, online: bool) -> list[Check]:
    configured = (
        settings.matrix_homeserver,
        settings.matrix_user_id,
        settings.matrix_password,
        settings.matrix_access_token,
    )
    if not any(configured):
        return [_check("off", "matrix", "MATRIX_HOMESERVER is not set")]
    problems = _matrix_offline(settings)
    if problems:
        return problems
    if not online:
        return [
            _check(
                "ok",
                "matrix",
                f"{settings.matrix_user_id} on {settings.matrix_homeserver}; "
                "`doctor --online` asks the homeserver",
            )
        ]
    return await _matrix_online(settings)


async def _matrix_online(settings: Settings) -> list[Check]:
    base = (settings.matrix_homeserver or "").rstrip("/")
    token = settings.matrix_access_token
    try:
        async with httpx.AsyncClient(base_url=base, timeout=ONLINE_TIMEOUT) as http:
            versions = await http.get("/_matrix/client/versions")
            whoami = None
            if token is not None and versions.status_code == 200:
                auth = {"Authorization": f"Bearer {token.get_secret_value()}"}
                whoami = await http.get("/_matrix/client/v3/account/whoami", headers=auth)
    except httpx.HTTPError as exc:
        return [
            _check(
                "FAIL",
                "matrix",
                f"the homeserver did not answer ({type(exc).__name__})",
                "check MATRIX_HOMESERVER and that the server is reachable from here",
            )
        ]
    if versions.status_code != 200:
        return [
            _check(
                "FAIL",
                "matrix",
                f"{base} is not a Matrix client API (HTTP {versions.status_code})",
                "set MATRIX_HOMESERVER to the client URL (see /.well-known/matrix/client)",
            )
        ]
    if whoami is None:
        return [
            _check(
                "ok",
                "matrix",
                "the homeserver answers; the password is tried at login "
                "(no test login, which would add a device)",
            )
        ]
    if whoami.status_code != 200:
        return [
            _check(
                "FAIL",
                "matrix",
                f"the homeserver rejected MATRIX_ACCESS_TOKEN (HTTP {whoami.status_code})",
                "make a new access token for the bot's account and set MATRIX_ACCESS_TOKEN",
            )
        ]
    user_id = whoami.json().get("user_id")
    if user_id != settings.matrix_user_id:
        return [
            _check(
                "FAIL",
                "matrix",
                f"the access token belongs to {user_id}, not {settings.matrix_user_id}",
                "set MATRIX_USER_ID to match the token, or use the bot account's token",
            )
        ]
    return [_check("ok", "matrix", f"logged in as {user_id}")]


def check_fal(settings: Settings) -> list[Check]:
    if settings.fal_key is None:
        return [_check("off", "fal", "FAL_KEY is not set: /imagine is off")]
    key = settings.fal_key.get_secret_value()
    if not _FAL_KEY.match(key):
        return [
            _check(
                "FAIL",
                "fal",
                "FAL_KEY looks wrong: Fal keys are KEY_ID:KEY_SECRET",
                "create a key at https://fal.ai/dashboard/keys and set FAL_KEY to the whole of it",
            )
        ]
    return [_check("ok", "fal", "FAL_KEY is set and well formed")]
