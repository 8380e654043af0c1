"""A fake of Discord's REST API on loopback: just the routes a cast's webhooks use.

Routes and payloads follow Discord's API reference (developer docs: Channel "Get Channel
Webhooks", Webhook "Create Webhook", "Modify Webhook", "Delete Webhook", "Execute Webhook" with
?wait, "Edit Webhook Message", "Delete Webhook Message"; Channel "Create Message", "Edit
Message", "Get Channel Message"; User "Get Current User"; Application "Get Current Application")
as discord.py 2.x calls them: the paths are the `Route(...)` strings in discord/http.py and
discord/webhook/async_.py, under Route.BASE (https://discord.com/api/v10, which the tests point
here). A 403 carries Discord's JSON error body (code 50013 Missing Permissions); a deleted
webhook gives 404 code 10015. A webhook's `avatar` is sent as image data (a `data:` URI, as
discord.py's `_bytes_to_base64_data` writes it) and comes back as a hash, which a message the
webhook posts without `avatar_url` carries as its author's avatar. Create Webhook refuses a name
containing "discord" or "clyde" (400, Invalid Form Body) and a sixteenth webhook in a channel
(400, code 30007 "Maximum number of webhooks reached (15)", Discord's JSON error codes).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.loopback import serve

BOT_ID = 900
GUILD_ID = 1
WEBHOOKS_PER_CHANNEL = 15


def avatar_hash(picture: bytes) -> str:
    """The fake's hash of a webhook's picture (Discord's own is opaque to clients)."""
    return hashlib.md5(picture).hexdigest()


def _picture(data_uri: str | None) -> bytes | None:
    """The bytes of a `data:image/...;base64,...` URI."""
    if not data_uri:
        return None
    return base64.b64decode(data_uri.split(",", 1)[1])


def _json(data: Any, status: int = 200) -> web.Response:
    """JSON exactly as Discord labels it: discord.py parses only "application/json" bodies."""
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def _user(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0000",
        "avatar": None,
        "global_name": None,
        "bot": bot,
    }


@dataclass
class FakeDiscord:
    forbidden: set[int] = field(default_factory=set)  # channels without Manage Webhooks
    webhooks: dict[int, dict[str, Any]] = field(default_factory=dict)  # webhook id → payload
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    pictures: dict[int, bytes] = field(default_factory=dict)  # webhook id → its avatar's bytes
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    url: str = ""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(10_000))
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        base = "/api/v10"
        app.router.add_get(f"{base}/users/@me", self._me)
        app.router.add_get(f"{base}/oauth2/applications/@me", self._application)
        app.router.add_get(f"{base}/channels/{{cid}}", self._channel)
        app.router.add_get(f"{base}/channels/{{cid}}/messages/{{mid}}", self._get_message)
        app.router.add_post(f"{base}/channels/{{cid}}/messages", self._create_message)
        app.router.add_patch(f"{base}/channels/{{cid}}/messages/{{mid}}", self._edit_message)
        app.router.add_get(f"{base}/channels/{{cid}}/webhooks", self._list_webhooks)
        app.router.add_post(f"{base}/channels/{{cid}}/webhooks", self._create_webhook)
        app.router.add_patch(f"{base}/webhooks/{{wid}}", self._modify_webhook)
        app.router.add_delete(f"{base}/webhooks/{{wid}}", self._delete_webhook)
        app.router.add_post(f"{base}/webhooks/{{wid}}/{{token}}", self._execute)
        app.router.add_patch(f"{base}/webhooks/{{wid}}/{{token}}/messages/{{mid}}", self._edit)
        app.router.add_delete(f"{base}/webhooks/{{wid}}/{{token}}/messages/{{mid}}", self._delete)
        self._runner, port = await serve(app)  # with the system's accept queue, as the other fakes
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def seen(self, method: str, prefix: str) -> list[dict[str, Any]]:
        """The bodies of the calls of `method` to paths starting with `prefix` (after /api/v10)."""
        return [body for m, path, body in self.calls if m == method and path.startswith(prefix)]

    def add_message(
        self, channel_id: int, author_id: int, content: str, *, reply_to: int | None = None
    ) -> int:
        """A person's message; `reply_to`: a Discord reply (message_reference) to that one."""
        extra: dict[str, Any] = {}
        if reply_to is not None:
            extra = {
                "type": 19,
                "message_reference": {
                    "message_id": str(reply_to),
                    "channel_id": str(channel_id),
                    "guild_id": str(GUILD_ID),
                },
                "referenced_message": self.messages[reply_to],
            }
        author = _user(author_id, f"user{author_id}")
        return int(self._message(channel_id, author, content, **extra)["id"])

    def add_webhook(self, channel_id: int, name: str) -> dict[str, Any]:
        """A webhook in the channel (the bot's, or another integration's)."""
        hook_id = next(self._ids)
        hook = {
            "id": str(hook_id),
            "type": 1,
            "guild_id": str(GUILD_ID),
            "channel_id": str(channel_id),
            "name": name,
            "avatar": None,
            "token": f"token-{hook_id}",
            "application_id": str(BOT_ID),
            "user": _user(BOT_ID, "personabot", bot=True),
        }
        self.webhooks[hook_id] = hook
        return hook

    # --- helpers ------------------------------------------------------------------------------

    def _message(
        self, channel_id: int, author: dict[str, Any], content: str, **extra: Any
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        message = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "guild_id": str(GUILD_ID),
            "author": author,
            "content": content,
            "timestamp": "2026-01-01T00:00:00+00:00",
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            **extra,
        }
        self.messages[message_id] = message
        return message

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if request.can_read_body:
            if request.content_type == "multipart/form-data":
                form = await request.post()
                body = json.loads(str(form.get("payload_json", "{}")))
            else:
                body = await request.json()
        self.calls.append((request.method, request.path.removeprefix("/api/v10"), body))
        return body

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        return _json({"message": message, "code": code}, status=status)

    # --- routes -------------------------------------------------------------------------------

    async def _me(self, request: web.Request) -> web.Response:
        await self._record(request)
        return _json(_user(BOT_ID, "personabot", bot=True))

    async def _application(self, request: web.Request) -> web.Response:
        await self._record(request)
        return _json(
            {
                "id": str(BOT_ID),
                "name": "personabot",
                "description": "",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "owner": _user(1, "owner"),
                "verify_key": "0" * 64,
                "flags": 0,
            }
        )

    async def _channel(self, request: web.Request) -> web.Response:
        await self._record(request)
        cid = request.match_info["cid"]
        return _json(
            {
                "id": cid,
                "type": 0,
                "guild_id": str(GUILD_ID),
                "name": f"channel-{cid}",
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "topic": None,
                "last_message_id": None,
                "rate_limit_per_user": 0,
            }
        )

    async def _get_message(self, request: web.Request) -> web.Response:
        await self._record(request)
        message = self.messages.get(int(request.match_info["mid"]))
        if message is None:
            return self._error(404, 10008, "Unknown Message")
        return _json(message)

    async def _create_message(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        cid = int(request.match_info["cid"])
        bot = _user(BOT_ID, "personabot", bot=True)
        return _json(self._message(cid, bot, body.get("content", "")))

    async def _edit_message(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        message = self.messages.get(int(request.match_info["mid"]))
        if message is None:
            return self._error(404, 10008, "Unknown Message")
        message["content"] = body.get("content", message["content"])
        message["edited_timestamp"] = "2026-01-01T00:00:01+00:00"
        return _json(message)

    async def _list_webhooks(self, request: web.Request) -> web.Response:
        await self._record(request)
        cid = int(request.match_info["cid"])
        if cid in self.forbidden:
            return self._error(403, 50013, "Missing Permissions")
        hooks = [h for h in self.webhooks.values() if int(h["channel_id"]) == cid]
        return _json(hooks)

    async def _create_webhook(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        cid = int(request.match_info["cid"])
        if cid in self.forbidden:
            return self._error(403, 50013, "Missing Permissions")
        if any(word in body["name"].lower() for word in ("discord", "clyde")):
            return self._error(400, 50035, "Invalid Form Body")
        if sum(int(h["channel_id"]) == cid for h in self.webhooks.values()) >= WEBHOOKS_PER_CHANNEL:
            return self._error(400, 30007, "Maximum number of webhooks reached (15)")
        hook = self.add_webhook(cid, body["name"])
        self._set_picture(hook, _picture(body.get("avatar")))
        return _json(hook)

    async def _modify_webhook(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        hook = self.webhooks.get(int(request.match_info["wid"]))
        if hook is None:
            return self._error(404, 10015, "Unknown Webhook")
        if "name" in body:
            hook["name"] = body["name"]
        if "avatar" in body:
            self._set_picture(hook, _picture(body["avatar"]))
        return _json(hook)

    async def _delete_webhook(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.webhooks.pop(int(request.match_info["wid"]), None) is None:
            return self._error(404, 10015, "Unknown Webhook")
        return web.Response(status=204)

    def _set_picture(self, hook: dict[str, Any], picture: bytes | None) -> None:
        hook["avatar"] = None if picture is None else avatar_hash(picture)
        if picture is None:
            self.pictures.pop(int(hook["id"]), None)
        else:
            self.pictures[int(hook["id"])] = picture

    def _hook(self, request: web.Request) -> dict[str, Any] | None:
        hook = self.webhooks.get(int(request.match_info["wid"]))
        if hook is None or hook["token"] != request.match_info["token"]:
            return None
        return hook

    async def _execute(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        hook = self._hook(request)
        if hook is None:
            return self._error(404, 10015, "Unknown Webhook")
        author = _user(int(hook["id"]), body.get("username") or hook["name"], bot=True)
        author["avatar"] = None if body.get("avatar_url") else hook["avatar"]
        message = self._message(
            int(hook["channel_id"]),
            author,
            body.get("content", ""),
            webhook_id=hook["id"],
        )
        if request.query.get("wait") not in ("1", "true"):  # discord.py sends wait=1
            return web.Response(status=204)
        return _json(message)

    async def _edit(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        message = self.messages.get(int(request.match_info["mid"]))
        if self._hook(request) is None or message is None:
            return self._error(404, 10015, "Unknown Webhook")
        message["content"] = body.get("content", message["content"])
        message["edited_timestamp"] = "2026-01-01T00:00:01+00:00"
        return _json(message)

    async def _delete(self, request: web.Request) -> web.Response:
        await self._record(request)
        self.messages.pop(int(request.match_info["mid"]), None)
        return web.Response(status=204)
