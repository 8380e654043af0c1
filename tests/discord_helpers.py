"""Test helpers for the Discord adapter: dpytest set-up, a payload recorder, a fake Interaction.

dpytest plays Discord's side for messages; it has no interactions, so slash commands are
called with `FakeInteraction` (Discord's side, not ours).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import discord
import discord.ext.test as dpytest
from discord.ext.test import backend, callbacks
from discord.ext.test import factories as facts


@dataclass
class Sent:
    """Everything the bot sent through Discord's HTTP API, with the raw payloads."""

    payloads: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    typing: int = 0


def record(client: discord.Client) -> Sent:
    """Wrap dpytest's fake HTTP so each payload (allowed_mentions included) is kept."""
    sent = Sent()
    http: Any = client.http
    original_send, original_edit = http.send_message, http.edit_message

    async def send_message(channel_id: int, *, params: Any) -> Any:
        payload = params.payload
        if payload is None and params.multipart:  # with files: the JSON is one form part
            part = next(p for p in params.multipart if p["name"] == "payload_json")
            payload = json.loads(part["value"])
        sent.payloads.append(dict(payload or {}))
        channel = sys._getframe(1).f_locals.get("channel")  # dpytest reads its caller's locals
        assert channel is not None
        return await original_send(channel_id, params=params)

    async def edit_message(channel_id: int, message_id: int, **fields: Any) -> Any:
        sent.edits.append(dict(fields["params"].payload or {}))
        self = sys._getframe(1).f_locals.get("self")  # the Message being edited, for dpytest
        assert self is not None
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
