"""Test helpers for the Discord adapter: dpytest set-up, a payload recorder, a fake Interaction.

dpytest plays Discord's side for messages; it has no interactions, so slash commands are
called with `FakeInteraction` (Discord's side, not ours).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord
import discord.ext.test as dpytest
from discord.ext.test import backend, callbacks
from discord.ext.test import factories as facts

EditHook = Callable[[], Awaitable[None]]


@dataclass
class Sent:
    """Everything the bot sent through Discord's HTTP API, with the raw payloads.

    `before_edit`, when set, runs before each edit reaches Discord: a test raises
    `discord.RateLimited` there (what discord.py raises for a 429 longer than the client's
    `max_ratelimit_timeout`) or waits (what discord.py does for a shorter 429)."""

    payloads: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    edit_times: list[float] = field(default_factory=list)
    typing: int = 0
    before_edit: EditHook | None = None


def _stored(channel_id: int, message_id: int) -> bool:
    return any(m["id"] == message_id for m in backend._cur_config.messages.get(channel_id, []))


def _unknown_message() -> discord.NotFound:
    # Discord's answer for a message that is gone: 404, JSON error code 10008 "Unknown Message"
    # (Discord API reference, JSON error codes).
    return discord.NotFound(
        backend.FakeRequest(404, "Not Found"), {"code": 10008, "message": "Unknown Message"}
    )


def _check_reference(channel_id: int, payload: dict[str, Any]) -> None:
    """Discord refuses a reply to a deleted message unless fail_if_not_exists is false: 400,
    code 50035 "Invalid Form Body" with REPLIES_UNKNOWN_MESSAGE under message_reference (the
    message reference structure in Discord's API reference; the error as Discord.Net#2282 and
    discord.js#5599 report it)."""
    reference = payload.get("message_reference")
    if not reference or reference.get("fail_if_not_exists") is False:
        return
    if not _stored(int(reference.get("channel_id", channel_id)), int(reference["message_id"])):
        raise discord.HTTPException(
            backend.FakeRequest(400, "Bad Request"),
            {
                "code": 50035,
                "message": "Invalid Form Body",
                "errors": {
                    "message_reference": {
                        "_errors": [
                            {"code": "REPLIES_UNKNOWN_MESSAGE", "message": "Unknown message"}
                        ]
                    }
                },
            },
        )


def record(client: discord.Client) -> Sent:
    """Wrap dpytest's fake HTTP so each payload (allowed_mentions included) is kept, and make it
    answer like Discord where dpytest does not: editing a deleted message, replying to one."""
    sent = Sent()
    http: Any = client.http
    original_send, original_edit = http.send_message, http.edit_message

    async def send_message(channel_id: int, *, params: Any) -> Any:
        payload = params.payload
        if payload is None and params.multipart:  # with files: the JSON is one form part
            part = next(p for p in params.multipart if p["name"] == "payload_json")
            payload = json.loads(part["value"])
        sent.payloads.append(dict(payload or {}))
        _check_reference(channel_id, dict(payload or {}))
        channel = sys._getframe(1).f_locals.get("channel")  # dpytest reads its caller's locals
        assert channel is not None
        return await original_send(channel_id, params=params)

    async def edit_message(channel_id: int, message_id: int, **fields: Any) -> Any:
        self = sys._getframe(1).f_locals.get("self")  # the Message being edited, for dpytest
        assert self is not None
        if sent.before_edit is not None:
            await sent.before_edit()
        if not _stored(channel_id, message_id):
            raise _unknown_message()
        sent.edits.append(dict(fields["params"].payload or {}))
        sent.edit_times.append(time.monotonic())
        return await original_edit(channel_id, message_id, **fields)

    async def on_typing(channel: Any) -> None:
        sent.typing += 1

    http.send_message = send_message
    http.edit_message = edit_message
    callbacks.set_callback(on_typing, "send_typing")
    return sent


def make_bot_member(guild: discord.Guild, name: str) -> discord.Member:
    state = backend.get_state()
    user = state.store_user(facts.make_user_dict(name, "0042", None, bot=True))
    return backend.make_member(user, guild)


async def reply_to(
    target: discord.Message,
    content: str,
    member: discord.Member,
    channel: Any,
    *,
    forward: bool = False,
) -> discord.Message:
    """A member's reply (Discord's message_reference) to `target`. A forward is a default
    message (type 0) whose reference has type 1 (FORWARD), per Discord's message reference docs."""
    guild = channel.guild
    data = facts.make_message_dict(
        channel,
        member,
        content=content,
        type=0 if forward else 19,
        mentions=backend.find_user_mentions(content, guild),
        mention_roles=backend.find_role_mentions(content, guild),
    )
    data["message_reference"] = {
        "type": 1 if forward else 0,
        "message_id": target.id,
        "channel_id": target.channel.id,
        "guild_id": channel.guild.id,
    }
    state = backend.get_state()
    state.parse_message_create(data)
    backend._cur_config.messages.setdefault(channel.id, []).append(data)  # as dpytest stores
    await dpytest.run_all_events()
    message = state._get_message(data["id"])
    assert message is not None
    return message


@dataclass
class FakeUser:
    id: int
    display_name: str
    roles: list[Any] = field(default_factory=list)


@dataclass
class FakeRole:
    id: int


class FakeResponse:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self._log = log
        self._done = False

    def is_done(self) -> bool:
        return self._done

    async def defer(self, *, ephemeral: bool = False, thinking: bool = False) -> None:
        assert not self._done, "an interaction can be answered only once"
        self._done = True
        self._log.append(("defer", ephemeral))

    async def send_message(self, content: str, **kwargs: Any) -> None:
        assert not self._done, "an interaction can be answered only once"
        self._done = True
        self._log.append(("send", content, kwargs))


class FakeFollowup:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self._log = log

    async def send(self, content: str, **kwargs: Any) -> None:
        self._log.append(("followup", content, kwargs))


class FakeInteraction:
    """What our callbacks use of discord.Interaction: user, channel, guild and the responses."""

    def __init__(self, user: FakeUser, channel: Any, guild_id: int | None = 1) -> None:
        self.user = user
        self.channel = channel
        self.channel_id = channel.id
        self.guild_id = guild_id
        self.log: list[tuple[Any, ...]] = []
        self.response = FakeResponse(self.log)
        self.followup = FakeFollowup(self.log)

    async def delete_original_response(self) -> None:
        self.log.append(("delete",))

    async def edit_original_response(self, **kwargs: Any) -> None:
        assert self.response.is_done(), "only a deferred or sent answer can be edited"
        assert kwargs["allowed_mentions"].to_dict() == {"parse": []}
        self.log.append(("edit", kwargs))

    def answers(self) -> list[tuple[str, bool]]:
        """(text, ephemeral) of everything shown to the user."""
        out: list[tuple[str, bool]] = []
        for entry in self.log:
            if entry[0] in ("send", "followup"):
                kwargs = entry[2]
                assert kwargs["allowed_mentions"].to_dict() == {"parse": []}
                out.append((entry[1], kwargs.get("ephemeral", False)))
        return out


def make_thread(
    parent: discord.TextChannel, thread_id: int, name: str = "a thread"
) -> discord.Thread:
    """A public thread under `parent`; started from a message, it has that message's id."""
    data: Any = {
        "id": thread_id,
        "guild_id": parent.guild.id,
        "parent_id": parent.id,
        "owner_id": parent.guild.me.id,
        "name": name,
        "type": discord.ChannelType.public_thread.value,
        "message_count": 0,
        "member_count": 0,
        "rate_limit_per_user": 0,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": 60,
            "archive_timestamp": "2026-01-01T00:00:00+00:00",
            "locked": False,
        },
    }
    thread = discord.Thread(guild=parent.guild, state=backend.get_state(), data=data)
    parent.guild._add_thread(thread)
    return thread


APPLICATION_ID = 1573680000000000999


class FakeCommandsApi:
    """Discord's application-command endpoints, which dpytest lacks. Wire format from Discord's
    API reference (Application Commands → Bulk Overwrite Global / Guild Application Commands):
    `PUT /applications/{application.id}/commands` and `.../guilds/{guild.id}/commands` take the
    whole list and answer with the stored command objects (`id`, `application_id`, `version`
    added). A guild the application may not write to answers 403, code 50001 "Missing Access".

    Installed as `client.http.request`, so discord.py's own `CommandTree.sync` drives it."""

    def __init__(self, client: discord.Client, *, refused: frozenset[int] = frozenset()) -> None:
        self.refused = refused
        self.global_set: list[dict[str, Any]] | None = None  # None: never written
        self.guild_sets: dict[int, list[dict[str, Any]]] = {}
        self._next_id = 1573680000000100000
        client._connection.application_id = APPLICATION_ID  # what READY tells a real client
        http: Any = client.http
        http.request = self.request

    async def request(self, route: discord.http.Route, **kwargs: Any) -> Any:
        assert route.method == "PUT", route.path
        assert route.path.startswith("/applications/{application_id}"), route.path
        assert f"/applications/{APPLICATION_ID}/" in route.url + "/", route.url
        guild_id = route.guild_id
        if guild_id is not None and int(guild_id) in self.refused:
            raise discord.Forbidden(
                backend.FakeRequest(403, "Forbidden"), {"code": 50001, "message": "Missing Access"}
            )
        stored = []
        for command in kwargs["json"]:
            self._next_id += 1
            stored.append(
                {
                    **command,
                    "id": str(self._next_id),
                    "application_id": str(APPLICATION_ID),
                    "version": "1",
                    **({"guild_id": str(guild_id)} if guild_id is not None else {}),
                }
            )
        if guild_id is None:
            self.global_set = stored
        else:
            self.guild_sets[int(guild_id)] = stored
        return stored

    def names(self, guild_id: int | None = None) -> list[str]:
        commands = self.global_set if guild_id is None else self.guild_sets.get(guild_id)
        return sorted(c["name"] for c in commands or [])
